"""What a cloud can do for fusion, as data: which endpoint, how many alternatives per token,
how it continues a partial reply, and the prompt format for a raw completions prompt.

A profile comes from a preset (the provider's documented behaviour) or from a probe of the
endpoint itself (engine/probe.py), cached per (base URL, model) until probed again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# How a partial reply is continued:
PREFILL = "prefill"  # chat; the server continues a trailing assistant message
CONTINUE_FINAL = "continue_final"  # chat with vLLM's continue_final_message fields
RAW_PROMPT = "raw_prompt"  # /v1/completions with the whole prompt rendered by Floe
NONE = "none"  # it cannot: ask once per reply and re-align to the cloud's own answer

CONTINUE_FINAL_FIELDS = {"continue_final_message": True, "add_generation_prompt": False}


@dataclass(frozen=True)
class CloudProfile:
    endpoint: str  # "chat" or "completions"
    continuation: str
    top_k: int  # alternatives per token the cloud gives; 0: no log-probabilities
    prompt_format: str = "chatml"  # only for RAW_PROMPT
    source: str = "preset"  # "preset NAME", "probe" or "settings"
    extra: dict[str, Any] = field(default_factory=dict)  # fields added to every request
    notes: tuple[str, ...] = ()  # what the probe saw, for `floe cloud probe`
    probed_at: float = 0.0

    @property
    def can_continue(self) -> bool:
        return self.continuation != NONE

    @property
    def fusable(self) -> bool:
        return self.top_k > 0

    def describe(self) -> str:
        """One line for the user: what fused replies will do with this cloud."""
        where = "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"
        if not self.fusable:
            return (f"{where} streams no log-probabilities: fused replies are local (cloud"
                    " mode still shows its own text)")
        how = {PREFILL: "continues a partial reply (assistant prefill)",
               CONTINUE_FINAL: "continues a partial reply (continue_final_message)",
               RAW_PROMPT: f"continues a raw prompt in the {self.prompt_format} format",
               NONE: "cannot continue a partial reply: asked once per reply, Floe"
                     " re-aligns to its answer"}[self.continuation]
        return f"{where}, top {self.top_k} log-probabilities, {how} [{self.source}]"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CloudProfile:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["notes"] = tuple(values.get("notes") or ())
        profile = cls(**values)
        if profile.endpoint not in ("chat", "completions") or profile.continuation not in (
                PREFILL, CONTINUE_FINAL, RAW_PROMPT, NONE) or not isinstance(profile.top_k, int):
            raise ValueError("not a cloud profile")
        return profile


# Documented behaviour of common servers and providers (each API reference, and the
# servers run on this machine: see the README's "Clouds" table).
PRESETS: dict[str, CloudProfile] = {
    "openai": CloudProfile("chat", NONE, 20, source="preset openai"),
    "groq": CloudProfile("chat", NONE, 0, source="preset groq"),
    "together": CloudProfile("chat", NONE, 5, source="preset together"),
    "vllm": CloudProfile("chat", CONTINUE_FINAL, 20, source="preset vllm",
                         extra=CONTINUE_FINAL_FIELDS),
    "sglang": CloudProfile("chat", CONTINUE_FINAL, 20, source="preset sglang",
                           extra=CONTINUE_FINAL_FIELDS),
    "llama.cpp": CloudProfile("chat", PREFILL, 20, source="preset llama.cpp"),
    "ollama": CloudProfile("chat", PREFILL, 20, source="preset ollama"),
    "tgi": CloudProfile("chat", PREFILL, 5, source="preset tgi"),
    "llama-cpp-python": CloudProfile("completions", RAW_PROMPT, 20,
                                     source="preset llama-cpp-python"),
}
# Hosted APIs recognised by their address, so `provider = "auto"` needs no probe for them.
HOSTS = {"api.openai.com": "openai", "api.groq.com": "groq", "api.together.xyz": "together",
         "api.together.ai": "together"}


def guess_prompt_format(model: str) -> str:
    """The chat template family from the model's name; "transcript" for base models."""
    name = model.lower()
    instruct = any(w in name for w in ("instruct", "-it", "chat", "-sft", "-dpo"))
    if not instruct:
        return "transcript"
    if "gemma" in name:
        return "gemma"
    if "llama-3" in name or "llama3" in name:
        return "llama3"
    return "chatml"  # Qwen, SmolLM, Hermes, Yi and most fine-tunes


def render_prompt(fmt: str, messages: list[dict[str, str]], prefix: str) -> str:
    """A raw completions prompt in the cloud model's own chat format, ending inside the
    assistant's turn with the reply written so far (no end-of-turn after it)."""
    if fmt == "chatml":
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                        for m in messages)
        return f"{turns}<|im_start|>assistant\n{prefix}"
    if fmt == "gemma":
        system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
        turns = []
        for m in (m for m in messages if m["role"] != "system"):
            role = "model" if m["role"] == "assistant" else "user"
            content = system + m["content"] if role == "user" and not turns else m["content"]
            turns.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
        return "".join(turns) + f"<start_of_turn>model\n{prefix}"
    if fmt == "llama3":
        turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                        f"{m['content']}<|eot_id|>" for m in messages)
        return (f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"
                f"{prefix}")
    lines = []
    for m in messages:
        if m["role"] == "system":
            lines.append(m["content"].strip() + "\n")
        else:
            who = "User" if m["role"] == "user" else "Assistant"
            lines.append(f"{who}: {m['content'].strip()}")
    return "\n".join(lines) + "\nAssistant:" + (" " + prefix if prefix else "")


STOPS = {"chatml": ["<|im_end|>"], "gemma": ["<end_of_turn>"], "llama3": ["<|eot_id|>"],
         "transcript": ["\nUser:"]}


def preset_for(provider: str, base_url: str) -> CloudProfile | None:
    """The preset a provider setting names; for "auto", one known by its host, else None."""
    if provider != "auto":
        return PRESETS.get(provider)
    host = urlparse(base_url).hostname or ""
    return PRESETS.get(HOSTS.get(host, ""))


def with_settings(profile: CloudProfile, endpoint: str, continuation: str, prompt_format: str,
                  model: str, top_k: int) -> CloudProfile:
    """Apply the user's explicit choices (anything not "auto") on top of a profile."""
    if continuation == "auto" and endpoint != "auto" and endpoint != profile.endpoint:
        # The other endpoint than the profile's: raw prompt on completions; on chat,
        # assume no prefill (safe: it costs requests, never quality).
        continuation = RAW_PROMPT if endpoint == "completions" else NONE
    if continuation != "auto" and continuation != profile.continuation:
        extra = CONTINUE_FINAL_FIELDS if continuation == CONTINUE_FINAL else {}
        profile = replace(profile, continuation=continuation, extra=extra,
                          endpoint="completions" if continuation == RAW_PROMPT else "chat",
                          source=f"{profile.source} + settings")
    if prompt_format != "auto":
        profile = replace(profile, prompt_format=prompt_format)
    elif profile.continuation == RAW_PROMPT and profile.source != "probe":
        profile = replace(profile, prompt_format=guess_prompt_format(model))
    return replace(profile, top_k=min(profile.top_k, top_k))


class ProfileCache:
    """Probed profiles per (base URL, model), in a JSON file in Floe's cache folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def key(base_url: str, model: str) -> str:
        return f"{base_url.rstrip('/')}|{model}"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, base_url: str, model: str) -> CloudProfile | None:
        raw = self._read().get(self.key(base_url, model))
        try:
            return CloudProfile.from_json(raw) if isinstance(raw, dict) else None
        except (TypeError, ValueError):
            return None  # a damaged entry is probed again

    def put(self, base_url: str, model: str, profile: CloudProfile | None) -> None:
        data = self._read()
        key = self.key(base_url, model)
        if profile is None:
            data.pop(key, None)
        else:
            data[key] = {**profile.to_json(), "probed_at": profile.probed_at or time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)
