"""Find out what a cloud can do for fusion, with a few tiny requests (each in the ledger).

1. Chat with log-probabilities at the configured k; after a 4xx, at k = 5, then without.
2. Chat continuing a partial reply: as is (llama.cpp's server, Ollama, TGI continue a
   trailing assistant message), then with vLLM's `continue_final_message` fields.
3. Where chat cannot continue: /v1/completions with a raw prompt in the model's format.
The best working method wins: chat that continues, then a raw prompt in the model's own
chat format, then chat answered once per reply (re-aligned), then a plain transcript.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from floe_app.engine.cloud import (
    AUTH,
    OK,
    RATE_LIMITED,
    TIMEOUT,
    UNREACHABLE,
    UNSUPPORTED,
    CloudUnavailable,
    LedgerEntry,
    Recorder,
)
from floe_app.engine.logprobs import AssembledToken, TokenAssembler
from floe_app.engine.profiles import (
    CONTINUE_FINAL,
    CONTINUE_FINAL_FIELDS,
    NONE,
    PREFILL,
    RAW_PROMPT,
    STOPS,
    CloudProfile,
    guess_prompt_format,
    render_prompt,
)

if TYPE_CHECKING:
    from floe_app.engine.cloud import CloudClient

GREETING = [{"role": "user", "content": "Say hello."}]
# A partial reply no fresh answer would repeat word for word, so an echo of it and a new
# answer cannot be confused: a continuation goes on with " Paris".
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PARTIAL = "Sure. As every atlas says, the capital city of France is"

FAILURES = {AUTH: "the cloud refused the API key", RATE_LIMITED: "the cloud is rate-limiting",
            TIMEOUT: "the cloud timed out", UNREACHABLE: "the cloud could not be reached"}


def continues(text: str, partial: str = PARTIAL) -> bool:
    """Did the cloud go on from the partial reply (possibly echoing it first)?"""
    rest = text[len(partial):] if text.startswith(partial) else text
    return rest[:1].isspace() and rest.strip().lower().startswith("paris")


@dataclass
class Seen:
    outcome: str
    error: str = ""
    text: str = ""
    top_k: int = 0  # most alternatives seen for one token
    logprobs: bool = False


def _ask(client: CloudClient, recorder: Recorder | None, endpoint: str,
         body: dict, text_sent: str) -> Seen:
    tokens: list[AssembledToken] = []
    assembler = TokenAssembler()
    entry = LedgerEntry(client.target.url(endpoint), client.target.model, text_sent,
                        purpose="probe")
    request = {"model": client.target.model, "stream": True, "temperature": 0, **body}
    outcome, error, _ = client.send(endpoint, request, entry, recorder, tokens.append,
                                    assembler=assembler)
    text = b"".join(t.text for t in tokens).decode("utf-8", errors="replace")
    top_k = max((len(t.top) for t in tokens), default=0)
    return Seen(outcome, error, text, top_k, assembler.saw_logprobs)


def _with_logprobs(client: CloudClient, recorder: Recorder | None, endpoint: str, body: dict,
                   text_sent: str, notes: list[str]) -> Seen:
    """Ask with log-probabilities at k, then 5 after a refusal, then without."""
    k = client.target.top_logprobs
    attempts = [k, 5, 0] if k > 5 else [k, 0]
    seen = Seen(UNSUPPORTED)
    for tries in attempts:
        extra = ({} if not tries else {"logprobs": True, "top_logprobs": tries}
                 if endpoint == "chat" else {"logprobs": tries})
        seen = _ask(client, recorder, endpoint, {**body, **extra}, text_sent)
        if seen.outcome in FAILURES:
            raise CloudUnavailable(seen.outcome, f"{FAILURES[seen.outcome]} ({seen.error})")
        label = f"/{'chat/' if endpoint == 'chat' else ''}completions"
        if seen.outcome == OK:
            if not seen.text.strip():
                notes.append(f"{label}: streams no text")
            elif tries and not seen.logprobs:
                notes.append(f"{label}: answers, but sends no log-probabilities")
            elif tries:
                notes.append(f"{label}: streams log-probabilities, {seen.top_k}"
                             f" alternatives per token (asked {tries})")
            else:
                notes.append(f"{label}: answers only without log-probabilities")
            return seen
        notes.append(f"{label} with {tries or 'no'} log-probabilities: refused"
                     f" ({seen.outcome}: {seen.error[:120]})")
    return seen


def probe(client: CloudClient, recorder: Recorder | None = None) -> CloudProfile:
    """The cloud's profile, from what it actually does. Raises CloudUnavailable."""
    notes: list[str] = []
    model = client.target.model
    chat = _with_logprobs(client, recorder, "chat", {"messages": GREETING, "max_tokens": 2},
                          json.dumps(GREETING), notes)
    chat_ok = chat.outcome == OK and bool(chat.text.strip())
    chat_k = chat.top_k if chat.logprobs else 0
    continuation = NONE
    if chat_ok:
        messages = [*QUESTION, {"role": "assistant", "content": PARTIAL}]
        for method, extra in ((PREFILL, {}), (CONTINUE_FINAL, CONTINUE_FINAL_FIELDS)):
            seen = _ask(client, recorder, "chat", {"messages": messages, "max_tokens": 4,
                                                   **extra}, json.dumps(messages))
            if seen.outcome == OK and continues(seen.text):
                continuation = method
                notes.append(f"/chat/completions continues a partial reply ({method})")
                break
            notes.append(f"/chat/completions, {method}: "
                         + (f"a new answer ({seen.text.strip()[:40]!r})" if seen.outcome == OK
                            else f"refused ({seen.outcome})"))
    if chat_ok and chat_k and continuation != NONE:
        return _profile("chat", continuation, chat_k, "chatml", notes)
    fmt = guess_prompt_format(model)
    prompt = render_prompt(fmt, QUESTION, PARTIAL)
    comp = _with_logprobs(client, recorder, "completions",
                          {"prompt": prompt, "max_tokens": 3, "stop": STOPS[fmt]}, prompt, notes)
    comp_ok = comp.outcome == OK and bool(comp.text.strip())
    comp_k = comp.top_k if comp.logprobs else 0
    if comp_ok:
        notes.append(f"/completions: a raw prompt in the {fmt} format is"
                     + (" continued" if continues(comp.text) else
                        f" answered with {comp.text.strip()[:40]!r}"))
    if comp_ok and comp_k and fmt != "transcript":
        return _profile("completions", RAW_PROMPT, comp_k, fmt, notes)
    if chat_ok and chat_k:
        return _profile("chat", NONE, chat_k, "chatml", notes)
    if comp_ok and comp_k:
        return _profile("completions", RAW_PROMPT, comp_k, fmt, notes)
    if chat_ok:
        return _profile("chat", continuation, 0, "chatml", notes)
    if comp_ok:
        return _profile("completions", RAW_PROMPT, 0, fmt, notes)
    raise CloudUnavailable(UNSUPPORTED, "the endpoint answered neither /chat/completions nor"
                           f" /completions for model {model!r} ({chat.error or comp.error})")


def _profile(endpoint: str, continuation: str, top_k: int, fmt: str,
             notes: list[str]) -> CloudProfile:
    return CloudProfile(endpoint, continuation, top_k, fmt, source="probe",
                        extra=CONTINUE_FINAL_FIELDS if continuation == CONTINUE_FINAL else {},
                        notes=tuple(notes), probed_at=time.time())
