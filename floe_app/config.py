"""Floe's settings: a TOML file, validated key by key.

A bad value never stops Floe: it is reported in one line naming the key and what is
allowed, and that key falls back to its default. The file is only rewritten when the user
saves settings, and a file Floe cannot parse is kept aside before that happens.
"""

from __future__ import annotations

import dataclasses
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from floe_app.paths import Paths

DEFAULT_SYSTEM_PROMPT = (
    "You are Floe, a concise and helpful assistant running on the user's own computer."
)


def _rule(allowed: str, check: Callable[[Any], bool], doc: str) -> dict[str, Any]:
    return {"allowed": allowed, "check": check, "doc": doc}


def _choice(choices: tuple[str, ...], doc: str) -> dict[str, Any]:
    """A key whose value is one of `choices` (the settings screen offers them in a list)."""
    quoted = [f'"{c}"' for c in choices]
    allowed = f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return {**_rule(allowed, lambda v: v in choices, doc), "choices": choices}


@dataclass
class ModelSettings:
    path: str = field(
        default="",
        metadata=_rule("a path to a .gguf file, or \"\" for the bundled model", lambda v: True,
                       "GGUF model to chat with; empty means the bundled SmolLM2-135M-Instruct"),
    )
    threads: int = field(
        default=0,
        metadata=_rule("a whole number from 0 to 256 (0 = automatic)",
                       lambda v: 0 <= v <= 256,
                       "CPU threads for generation; 0: up to one per physical core, fewer"
                       " while other programs keep cores busy"),
    )
    context_tokens: int = field(
        default=4096,
        metadata=_rule("a whole number from 512 to 131072", lambda v: 512 <= v <= 131072,
                       "context window in tokens; longer input is clipped with a notice"),
    )


@dataclass
class ChatSettings:
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata=_rule("text of at most 4000 characters", lambda v: len(v) <= 4000,
                       "instructions given to the model before every conversation"),
    )
    temperature: float = field(
        default=0.7,
        metadata=_rule("a number from 0 to 2 (0 = always the likeliest token)",
                       lambda v: 0 <= v <= 2, "sampling temperature"),
    )
    top_p: float = field(
        default=0.95,
        metadata=_rule("a number above 0 and at most 1", lambda v: 0 < v <= 1,
                       "nucleus sampling: keep the smallest set of tokens with this much mass"),
    )
    top_k: int = field(
        default=40,
        metadata=_rule("a whole number from 0 to 1000 (0 = no limit)", lambda v: 0 <= v <= 1000,
                       "sample only among this many likeliest tokens"),
    )
    max_tokens: int = field(
        default=512,
        metadata=_rule("a whole number from 1 to 8192", lambda v: 1 <= v <= 8192,
                       "longest reply in tokens"),
    )
    seed: int = field(
        default=-1,
        metadata=_rule("a whole number (-1 = random)", lambda v: v >= -1,
                       "sampling seed, for reproducible replies"),
    )
    min_p: float = field(
        default=0.05,
        metadata=_rule("a number from 0 to 1 (0 = off)", lambda v: 0 <= v <= 1,
                       "drop tokens less likely than this share of the likeliest one"),
    )
    repeat_penalty: float = field(
        default=1.1,
        metadata=_rule("a number from 1 to 2 (1 = off)", lambda v: 1 <= v <= 2,
                       "discourage tokens the reply used recently (llama.cpp's repeat penalty)"),
    )
    penalty_last_n: int = field(
        default=64,
        metadata=_rule("a whole number from 0 to 8192", lambda v: 0 <= v <= 8192,
                       "how many of the reply's last tokens the repeat penalties look at"),
    )
    presence_penalty: float = field(
        default=0.0,
        metadata=_rule("a number from 0 to 2", lambda v: 0 <= v <= 2,
                       "subtracted from a recent token's logit once (OpenAI-style)"),
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata=_rule("a number from 0 to 2", lambda v: 0 <= v <= 2,
                       "subtracted from a recent token's logit per use (OpenAI-style)"),
    )
    dry_multiplier: float = field(
        default=0.8,
        metadata=_rule("a number from 0 to 5 (0 = off)", lambda v: 0 <= v <= 5,
                       "DRY: penalty for continuing a word sequence the reply already wrote"),
    )
    dry_base: float = field(
        default=1.75,
        metadata=_rule("a number from 1 to 4", lambda v: 1 <= v <= 4,
                       "DRY: how fast the penalty grows with the length of the repeat"),
    )
    dry_allowed_length: int = field(
        default=2,
        metadata=_rule("a whole number from 1 to 20", lambda v: 1 <= v <= 20,
                       "DRY: repeats up to this many tokens are free"),
    )
    model_defaults: bool = field(
        default=True,
        metadata=_rule("true or false", lambda v: True,
                       "use the sampling values a model file recommends for keys left at"
                       " their default"),
    )
    mode: str = field(
        default="auto",
        metadata=_choice(("auto", "local", "cloud", "fused"),
                         "default reply mode; auto is fused when a cloud is set, else local"),
    )


# Servers and providers with a preset (engine/profiles.py says what each one does).
PROVIDERS = ("openai", "vllm", "sglang", "llama.cpp", "llama-cpp-python", "ollama", "tgi",
             "together", "groq")
CONTINUATIONS = ("prefill", "continue_final", "raw_prompt", "none")
PROMPT_FORMATS = ("chatml", "gemma", "llama3", "transcript")
# Keys earlier versions wrote into every config file; dropped silently, and from the file
# at the next save (cloud.api became cloud.endpoint; the misses and restarts caps became
# fusion.max_requests and the per-reply wait budget).
RETIRED_KEYS = {"cloud.api", "fusion.max_misses", "fusion.max_restarts"}


@dataclass
class CloudSettings:
    base_url: str = field(
        default="",
        metadata=_rule("an http(s) URL ending in /v1, or \"\" for none",
                       lambda v: v == "" or v.startswith(("http://", "https://")),
                       "OpenAI-compatible endpoint (env FLOE_CLOUD_BASE_URL wins)"),
    )
    model: str = field(
        default="",
        metadata=_rule("a model name the endpoint serves", lambda v: True,
                       "cloud model (env FLOE_CLOUD_MODEL wins)"),
    )
    provider: str = field(
        default="auto",
        metadata=_choice(("auto", *PROVIDERS),
                         "what serves the cloud: auto probes it once (floe cloud probe), a"
                         " name uses that server's documented behaviour"),
    )
    endpoint: str = field(
        default="auto",
        metadata=_choice(("auto", "chat", "completions"),
                           "stream from /v1/chat/completions or /v1/completions (auto: the"
                         " provider's or the probe's choice)"),
    )
    continuation: str = field(
        default="auto",
        metadata=_choice(("auto", *CONTINUATIONS),
                         "how the cloud continues a partial reply: chat prefill, vLLM's"
                         " continue_final_message, a raw completions prompt, or not at all"),
    )
    prompt_format: str = field(
        default="auto",
        metadata=_choice(("auto", *PROMPT_FORMATS),
                         "the cloud model's chat template for raw completions prompts (auto:"
                         " from the model name; transcript for base models)"),
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata=_rule("an environment variable name", lambda v: v.replace("_", "").isalnum(),
                       "environment variable holding the API key (the key is never stored)"),
    )
    top_logprobs: int = field(
        default=20,
        metadata=_rule("a whole number from 1 to 20", lambda v: 1 <= v <= 20,
                       "alternatives per cloud token asked for (a cloud's lower limit is probed)"),
    )
    timeout_s: float = field(
        default=15.0,
        metadata=_rule("a number from 1 to 300", lambda v: 1 <= v <= 300,
                       "seconds before a silent cloud request is abandoned"),
    )


@dataclass
class FusionSettings:
    deadline_ms: int = field(
        default=600,
        metadata=_rule("a whole number from 5 to 5000", lambda v: 5 <= v <= 5000,
                       "longest wait for the cloud at one token where the local model is"
                       " unsure; where it is sure, or at the first token, it never waits"),
    )
    wait_budget_ms: int = field(
        default=1500,
        metadata=_rule("a whole number from 0 to 60000", lambda v: 0 <= v <= 60000,
                       "longest total wait for the cloud in one reply"),
    )
    sure_prob: float = field(
        default=0.9,
        metadata=_rule("a number from 0.5 to 1", lambda v: 0.5 <= v <= 1,
                       "the local model counts as sure of a token at this probability"),
    )
    form: str = field(
        default="log_linear",
        metadata=_choice(("log_linear", "proxy"),
                         "how distributions combine: weighted log-linear, or proxy-tuning"),
    )
    lambda_min: float = field(
        default=1.0,
        metadata=_rule("a number from 0 to 1", lambda v: 0 <= v <= 1,
                       "cloud weight where the cloud is unsure (lower it for a cloud no"
                       " stronger than the local model)"),
    )
    lambda_max: float = field(
        default=1.0,
        metadata=_rule("a number from 0 to 1", lambda v: 0 <= v <= 1,
                       "cloud weight where the cloud is sure (1: a sure cloud decides)"),
    )
    private_kl: float = field(
        default=2.0,
        metadata=_rule("a number from 0 to 50", lambda v: 0 <= v <= 50,
                       "a reply whose words your private notes or adapter move this much"
                       " (KL, nats) is left to the local model; 0: always, where there are any"),
    )
    beta: float = field(
        default=1.0,
        metadata=_rule("a number from 0 to 4", lambda v: 0 <= v <= 4,
                       "proxy form: strength of the local adaptation on top of the cloud"),
    )
    first_token_ms: int = field(
        default=2500,
        metadata=_rule("a whole number from 100 to 60000", lambda v: 100 <= v <= 60000,
                       "how long the cloud may take to start answering before it is given up"),
    )
    batch_tokens: int = field(
        default=16,
        metadata=_rule("a whole number from 0 to 16 (0 = off)", lambda v: 0 <= v <= 16,
                       "most of the cloud's tokens ahead of the reply checked in one local"
                       " batch (speculative decoding with the cloud as the drafter)"),
    )
    keep_to_cloud_nats: float = field(
        default=1.5,
        metadata=_rule("a number from 0 to 5", lambda v: 0 <= v <= 5,
                       "greedy replies keep to the cloud's own text where its token is within"
                       " this many nats of the fused choice (leaving it costs a request and"
                       " the cloud's tokens ahead); 0: always the fused choice"),
    )
    max_requests: int = field(
        default=3,
        metadata=_rule("a whole number from 1 to 50", lambda v: 1 <= v <= 50,
                       "billed cloud requests in one reply, at most; then the reply"
                       " re-aligns to the cloud's text it has, or goes on locally"),
    )


@dataclass
class PrivacySettings:
    local_only: bool = field(
        default=False,
        metadata=_rule("true or false", lambda v: True,
                       "true: nothing is ever sent to a cloud, whatever else is set"),
    )
    redact_terms: list = field(
        default_factory=list,
        metadata=_rule("a list of strings", lambda v: all(isinstance(t, str) for t in v),
                       "words and names replaced by placeholders before anything is sent"),
    )


TIER_NAMES = ("auto", "small", "medium", "large")


@dataclass
class LearningSettings:
    paused: bool = field(
        default=False,
        metadata=_rule("true or false", lambda v: True,
                       "true: no new adapter is trained; the active one stays in use"),
    )
    auto: bool = field(
        default=True,
        metadata=_rule("true or false", lambda v: True,
                       "train in the background after you teach something (else: floe train)"),
    )
    delay_s: int = field(
        default=60,
        metadata=_rule("a whole number from 0 to 86400", lambda v: 0 <= v <= 86400,
                       "quiet seconds after the last thing taught before training starts"),
    )
    tier: str = field(
        default="auto",
        metadata=_choice(TIER_NAMES, "training size: auto picks from this computer's cores,"
                         " memory and power"),
    )
    threads: int = field(
        default=0,
        metadata=_rule("a whole number from 0 to 256", lambda v: 0 <= v <= 256,
                       "CPU threads training may use (0: as many as the tier and cores allow)"),
    )
    perplexity_margin: float = field(
        default=0.05,
        metadata=_rule("a number from 0 to 1", lambda v: 0 <= v <= 1,
                       "largest rise of general-text perplexity a new adapter may cause"),
    )


@dataclass
class FederationSettings:
    enabled: bool = field(
        default=False,
        metadata=_rule("true or false", lambda v: True,
                       "join federated rounds (floe sync start); false stops every upload"),
    )
    address: str = field(
        default="",
        metadata=_rule("host:port", lambda v: v == "" or (":" in v and " " not in v),
                       "the federation's SuperLink (Fleet API), given by its operator"),
    )
    root_certificates: str = field(
        default="",
        metadata=_rule("a file path or empty", lambda v: True,
                       "the federation's TLS root certificate (PEM); empty: no TLS (loopback)"),
    )
    node_key: str = field(
        default="",
        metadata=_rule("a file path or empty", lambda v: True,
                       "this device's private key, if the federation authenticates nodes"),
    )
    require: str = field(
        default="any",
        metadata=_choice(("any", "formal_dp", "local_dp", "secure_aggregation"),
                         "which federations this device takes part in: any; only with a"
                         " formal DP guarantee; only with noise added on this device; only"
                         " where the operator sees just the sum (secure aggregation)"),
    )
    min_noise_multiplier: float = field(
        default=0.0,
        metadata=_rule("a number from 0 to 100", lambda v: 0 <= v <= 100,
                       "least DP noise multiplier a federation must use (0: no minimum);"
                       " under local DP this device adds at least this much itself"),
    )
    max_epsilon: float = field(
        default=10.0,
        metadata=_rule("a number above 0", lambda v: v > 0,
                       "privacy budget: no upload once epsilon would pass it"),
    )
    delta: float = field(
        default=1e-5,
        metadata=_rule("a number between 0 and 0.01", lambda v: 0 < v <= 0.01,
                       "the delta epsilon is reported at"),
    )
    share_replies: bool = field(
        default=True,
        metadata=_rule("true or false", lambda v: True,
                       "the shared adapter learns from replies you gave a thumbs up"),
    )
    share_corrections: bool = field(
        default=True,
        metadata=_rule("true or false", lambda v: True,
                       "the shared adapter learns from your corrections"),
    )


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    cloud: CloudSettings = field(default_factory=CloudSettings)
    fusion: FusionSettings = field(default_factory=FusionSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    learning: LearningSettings = field(default_factory=LearningSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)


@dataclass(frozen=True)
class SettingSpec:
    """One key of the file: where it lives, its type, and what values it allows."""

    section: str
    name: str
    type: type
    default: Any
    allowed: str
    check: Callable[[Any], bool]
    doc: str
    choices: tuple[str, ...] = ()  # for a key whose value is one of a few names

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    def coerce(self, value: Any) -> Any:
        """Return the value as this setting's type, or raise ValueError."""
        if isinstance(value, bool) and self.type is not bool:
            raise ValueError
        if self.type is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, self.type):
            raise ValueError
        if not self.check(value):
            raise ValueError
        return value


def setting_specs() -> list[SettingSpec]:
    specs = []
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            specs.append(SettingSpec(section.name, f.name, type(default), default,
                                     f.metadata["allowed"], f.metadata["check"],
                                     f.metadata["doc"], f.metadata.get("choices", ())))
    return specs


def _read_toml(path: Path) -> tuple[dict[str, Any], list[str]]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh), []
    except tomllib.TOMLDecodeError as exc:
        return {}, [f"{path}: not valid TOML ({exc}); using defaults for every key"]
    except UnicodeDecodeError as exc:
        return {}, [f"{path}: not UTF-8 text (byte {exc.start}); using defaults for every key"]
    except OSError as exc:
        return {}, [f"{path}: cannot be read ({exc.strerror}); using defaults for every key"]


def _shown(value: object, limit: int = 80) -> str:
    """A name or value from the user's file, on one line and not too long (warnings)."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_config(raw: dict[str, Any], origin: str = "config.toml") -> tuple[Config, list[str]]:
    """Validate a parsed TOML document; returns the config and one warning per bad key."""
    config = Config()
    warnings: list[str] = []
    specs = {spec.key: spec for spec in setting_specs()}
    sections = {f.name for f in dataclasses.fields(Config)}
    for section, values in raw.items():
        if section not in sections:
            warnings.append(f"{origin}: unknown section [{_shown(section)}] is ignored")
            continue
        if not isinstance(values, dict):
            warnings.append(f"{origin}: {section} should be a [{section}] table; using defaults")
            continue
        for name, value in values.items():
            spec = specs.get(f"{section}.{name}")
            if spec is None and f"{section}.{name}" in RETIRED_KEYS:
                continue
            if spec is None:
                warnings.append(f"{origin}: unknown key {section}.{_shown(name)} is ignored")
                continue
            try:
                setattr(getattr(config, section), name, spec.coerce(value))
            except ValueError:
                warnings.append(
                    f"{origin}: {spec.key} = {_shown(repr(value))} is not allowed; expected"
                    f" {spec.allowed}."
                    f" Using the default {spec.default!r}"
                )
    return config, warnings


def load_config(paths: Paths) -> tuple[Config, list[str]]:
    """Read the config file, writing a commented default one on first run."""
    path = paths.config_file
    if not path.exists():
        try:
            write_config(paths, Config())
        except OSError as exc:
            return Config(), [f"{path}: cannot be written ({exc.strerror}); using defaults"]
        return Config(), []
    raw, warnings = _read_toml(path)
    config, more = parse_config(raw, origin=str(path))
    return config, warnings + more


def write_config(paths: Paths, config: Config) -> Path:
    """Save settings, keeping the user's comments and unknown keys where the file parses."""
    import tomlkit

    path = paths.config_file
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = None
    if path.exists():
        try:
            doc = tomlkit.parse(path.read_text(encoding="utf-8"))
        except (tomlkit.exceptions.ParseError, UnicodeDecodeError):
            # Keep the unreadable file for the user instead of overwriting their work.
            path.replace(path.with_name(f"config.toml.broken-{int(time.time())}"))
    if doc is None:
        doc = tomlkit.document()
        doc.add(tomlkit.comment("Floe settings. Delete a key to go back to its default."))
    for key in RETIRED_KEYS:
        section, name = key.split(".")
        table = doc.get(section)
        if isinstance(table, dict) and name in table:
            del table[name]
    for spec in setting_specs():
        table = doc.get(spec.section)
        if not isinstance(table, dict):
            table = tomlkit.table()
            doc[spec.section] = table
        value = getattr(getattr(config, spec.section), spec.name)
        if spec.name in table:
            table[spec.name] = value
        else:
            table.add(tomlkit.comment(f"{spec.doc}: {spec.allowed}"))
            table.add(spec.name, value)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(tomlkit.dumps(doc), encoding="utf-8")
    os.replace(tmp, path)
    return path
