"""What a cloud's streamed chunks say about each token: its bytes, its log-probability and
the alternatives. Pure functions over the JSON of each chunk; no network.

Servers disagree on the shape (all seen in their docs or on this machine):
- `logprobs.content`, a list of {token, logprob, bytes, top_logprobs: [...]}: OpenAI's chat
  API, vLLM, SGLang, TGI and Ollama on chat, llama.cpp's server on both endpoints;
- the legacy shape {tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset}:
  OpenAI's and vLLM's /v1/completions, llama-cpp-python's server;
- a bare number (the chosen token's log-probability) with the alternatives, if any, as a
  {text: logprob} dict beside it: Together's streamed chunks;
- tokens that are not whole UTF-8 text: OpenAI writes them as `bytes:\\xe2\\x80`, vLLM and
  Ollama as U+FFFD, which says only "part of a character".

`TokenAssembler` turns a sequence of chunks into tokens whose bytes add up to exactly the
text the server streamed. Where the per-token data cannot be matched to that text (an
unknown partial character, an echoed prefix it cannot explain), the text goes out as one
token with what is known of its probability and no alternatives: never a certainty the
cloud did not state.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

REPLACEMENT = "\ufffd"
_BYTES_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


class MalformedChunk(ValueError):
    """A chunk that no known server sends; the stream is treated as broken."""


@dataclass(frozen=True)
class ParsedToken:
    text: bytes | None  # None: the server did not say which bytes (U+FFFD, no `bytes`)
    logprob: float | None  # None: not stated
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class ParsedChunk:
    text: bytes  # what the chunk adds to the reply's text
    tokens: tuple[ParsedToken, ...] | None  # None: the chunk carries no log-probabilities
    finish_reason: str | None = None


def token_bytes(token: Any, raw: Any = None) -> bytes | None:
    """A token's bytes from its `bytes` list, a `bytes:\\x..` string or its text."""
    if isinstance(raw, list) and raw and all(isinstance(b, int) and 0 <= b < 256
                                             for b in raw):
        return bytes(raw)
    if not isinstance(token, str):
        raise MalformedChunk(f"a token is {type(token).__name__}, not text")
    if token.startswith("bytes:") and _BYTES_ESCAPE.search(token):
        return bytes(int(h, 16) for h in _BYTES_ESCAPE.findall(token))
    if REPLACEMENT in token:
        return None
    return token.encode("utf-8")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    if math.isnan(value) or value > 0:  # a log-probability is <= 0
        return None
    return max(value, -1e4)  # -inf and huge negatives: "never", kept finite


def _alternatives(items: Any) -> tuple[tuple[bytes, float], ...]:
    """Alternatives from a [{token, logprob, bytes}] list or a {text: logprob} dict;
    those whose bytes are unknown are left out (their mass stays unassigned)."""
    out = []
    if isinstance(items, dict):
        pairs = [(text, None, lp) for text, lp in items.items()]
    elif isinstance(items, list):
        pairs = [(i.get("token"), i.get("bytes"), i.get("logprob")) for i in items
                 if isinstance(i, dict)]
    else:
        return ()
    for text, raw, lp in pairs:
        logprob = _number(lp)
        if logprob is None or not isinstance(text, str):
            continue
        data = token_bytes(text, raw)
        if data is not None:
            out.append((data, logprob))
    return tuple(out)


def _content_tokens(items: list[Any]) -> tuple[ParsedToken, ...]:
    tokens = []
    for item in items:
        if not isinstance(item, dict):
            raise MalformedChunk("a logprobs.content entry is not an object")
        tokens.append(ParsedToken(token_bytes(item.get("token"), item.get("bytes")),
                                  _number(item.get("logprob")),
                                  _alternatives(item.get("top_logprobs"))))
    return tuple(tokens)


def _legacy_tokens(logprobs: dict[str, Any]) -> tuple[ParsedToken, ...]:
    texts = logprobs.get("tokens") or []
    chosen = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    if not all(isinstance(x, list) for x in (texts, chosen, tops)):
        raise MalformedChunk("legacy logprobs fields are not lists")
    return tuple(ParsedToken(token_bytes(text), _number(chosen[i]) if i < len(chosen) else None,
                             _alternatives(tops[i]) if i < len(tops) else ())
                 for i, text in enumerate(texts))


def parse_chunk(chunk: Any) -> ParsedChunk | None:
    """One streamed chunk (its JSON) of either endpoint; None if it has no choice."""
    if not isinstance(chunk, dict):
        raise MalformedChunk("a chunk is not a JSON object")
    choices = chunk.get("choices")
    if not choices:
        return None  # usage-only or keep-alive chunks
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise MalformedChunk("choices is not a list of objects")
    choice = choices[0]
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise MalformedChunk("the chunk's text is not a string")
    finish = choice.get("finish_reason")
    finish = finish if isinstance(finish, str) else None
    logprobs = choice.get("logprobs")
    tokens: tuple[ParsedToken, ...] | None
    if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
        tokens = _content_tokens(logprobs["content"])
    elif isinstance(logprobs, dict) and "tokens" in logprobs:
        tokens = _legacy_tokens(logprobs)
    elif _number(logprobs) is not None and text:
        # Together: the chosen token's log-probability, alternatives (if any) beside it.
        top = _alternatives(choice.get("top_logprobs"))
        tokens = (ParsedToken(text.encode("utf-8"), _number(logprobs), top),)
    elif logprobs is None or (isinstance(logprobs, dict) and not logprobs.get("content")):
        tokens = None
    else:
        raise MalformedChunk(f"logprobs of type {type(logprobs).__name__} is not understood")
    return ParsedChunk(text.encode("utf-8"), tokens, finish)


@dataclass(frozen=True)
class AssembledToken:
    text: bytes
    logprob: float | None
    top: tuple[tuple[bytes, float], ...]


@dataclass
class TokenAssembler:
    """Tokens whose bytes add up to the streamed text, chunk after chunk.

    `echo` is the partial reply sent for the cloud to continue: a server that repeats it at
    the start of its text (llama.cpp's server does, on chat) has it removed here.
    """

    echo: bytes = b""
    saw_logprobs: bool = False  # some chunk carried log-probabilities
    saw_alternatives: bool = False  # some token came with alternatives
    merged: int = 0  # tokens sent on as text only (their bytes could not be matched)
    _text: bytes = b""  # streamed text so far, less an echo
    _emitted: int = 0
    _pending: list[ParsedToken] = field(default_factory=list)
    _started: bool = False

    def feed(self, chunk: ParsedChunk) -> list[AssembledToken]:
        text = chunk.text
        if not self._started and text:
            self._started = True
            text = self._strip_echo(text, chunk.tokens)
        self._text += text
        if chunk.tokens is not None:
            self.saw_logprobs = True
            self.saw_alternatives |= any(t.top for t in chunk.tokens)
            self._pending.extend(chunk.tokens)
        elif text:
            self._pending.append(ParsedToken(None, None))  # text with nothing known of it
        return self._drain(final=chunk.finish_reason is not None)

    def finish(self) -> list[AssembledToken]:
        """The stream ended: whatever text is left goes out."""
        return self._drain(final=True)

    def _strip_echo(self, text: bytes, tokens: tuple[ParsedToken, ...] | None) -> bytes:
        if not self.echo:
            return text
        if text.startswith(self.echo):
            return text[len(self.echo):]
        known = [t.text for t in tokens or ()]
        if known and None not in known:
            joined = b"".join(known)  # type: ignore[arg-type]
            extra = text[:len(text) - len(joined)]
            if text.endswith(joined) and extra and self.echo.endswith(extra):
                return joined
        return text

    def _drain(self, final: bool) -> list[AssembledToken]:
        available = self._text[self._emitted:]
        pending = self._pending
        if not pending:
            return []
        if all(t.text is not None for t in pending):
            joined = b"".join(t.text for t in pending)  # type: ignore[misc]
            if joined == available:
                return self._emit([AssembledToken(t.text, t.logprob, t.top)  # type: ignore[arg-type]
                                   for t in pending])
            if available and joined.startswith(available) and not final:
                return []  # the server holds back the text of a partial character
            if not available and final:
                self._pending = []  # e.g. an end-of-turn token that has no text
                return []
        elif not available:
            return []  # unknown bytes: wait for the text that shows them
        if not available:
            return []
        known = [t.logprob for t in pending]
        logprob = sum(known) if None not in known else None  # type: ignore[arg-type]
        self.merged += len(pending)
        return self._emit([AssembledToken(available, logprob, ())])

    def _emit(self, tokens: list[AssembledToken]) -> list[AssembledToken]:
        self._pending = []
        self._emitted += sum(len(t.text) for t in tokens)
        return [t for t in tokens if t.text]
