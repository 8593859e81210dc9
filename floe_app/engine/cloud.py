"""The cloud LLM behind any OpenAI-compatible API, streamed with top-k log-probabilities.

A CloudStream reads one request in a background thread, so the local decoder never waits
on the network longer than it chooses to. Failures become one of a few outcomes the
decoder understands. The API key lives in the environment only: it is never stored,
logged or written to the ledger.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from floe_app.config import CloudSettings
from floe_app.engine.fusion import CloudToken

# Outcomes of a request, as the decoder and the ledger see them.
OK = "ok"
AUTH = "auth"  # 401/403: the key is wrong; retrying will not help
RATE_LIMITED = "rate_limited"  # 429
SERVER_ERROR = "server_error"  # 5xx
UNSUPPORTED = "unsupported"  # 400/404: the endpoint refuses logprobs, or the model is unknown
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"  # connection refused or reset before a response
BROKEN = "broken_stream"  # the response started, then broke off
CANCELLED = "cancelled"
NOT_SENT = "not_sent"  # the ledger could not record the request, so it was not sent


@dataclass(frozen=True)
class CloudTarget:
    """Where the cloud is: config, with FLOE_CLOUD_BASE_URL / FLOE_CLOUD_MODEL on top."""

    base_url: str
    model: str
    api: str = "completions"
    api_key: str | None = None
    top_logprobs: int = 20
    timeout_s: float = 15.0

    @classmethod
    def from_settings(cls, settings: CloudSettings,
                      env: dict[str, str] | None = None) -> CloudTarget | None:
        env = dict(os.environ) if env is None else env
        base_url = env.get("FLOE_CLOUD_BASE_URL") or settings.base_url
        model = env.get("FLOE_CLOUD_MODEL") or settings.model
        if not base_url or not model:
            return None
        return cls(base_url.rstrip("/"), model, settings.api, env.get(settings.api_key_env),
                   settings.top_logprobs, settings.timeout_s)

    @property
    def endpoint(self) -> str:
        return f"{self.base_url}/{'chat/completions' if self.api == 'chat' else 'completions'}"


def render_transcript(messages: list[dict[str, str]], prefix: str) -> str:
    """A plain transcript for /v1/completions, ending with the reply written so far."""
    lines = []
    for message in messages:
        if message["role"] == "system":
            lines.append(message["content"].strip() + "\n")
        else:
            who = "User" if message["role"] == "user" else "Assistant"
            lines.append(f"{who}: {message['content'].strip()}")
    return "\n".join(lines) + "\nAssistant:" + (" " + prefix if prefix else "")


@dataclass
class LedgerEntry:
    """What one request sent, for the privacy ledger (filled in as the request goes)."""

    endpoint: str
    model: str
    text_sent: str
    bytes_sent: int = 0
    bytes_received: int = 0
    outcome: str = ""


Recorder = Callable[[LedgerEntry], Callable[[LedgerEntry], None]]


def classify(exc: BaseException, started: bool) -> str:
    import httpx2
    import openai

    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return AUTH
    if isinstance(exc, openai.RateLimitError):
        return RATE_LIMITED
    if isinstance(exc, openai.BadRequestError | openai.NotFoundError):
        return UNSUPPORTED
    if isinstance(exc, openai.APIStatusError):
        return SERVER_ERROR if exc.status_code >= 500 else UNSUPPORTED
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return TIMEOUT
    if not started and isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return UNREACHABLE
    return BROKEN


@dataclass
class CloudStream:
    """One streamed continuation; tokens arrive from a background thread."""

    target: CloudTarget
    tokens: list[CloudToken] = field(default_factory=list)
    text: bytes = b""
    finished: bool = False  # the cloud ended its continuation (stop or length)
    outcome: str = ""  # set once the request is over, one of the outcomes above
    error: str = ""
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    entry: LedgerEntry | None = None
    strip_leading: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _response: Any = None

    @property
    def done(self) -> bool:
        return bool(self.outcome)

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait (at most timeout seconds) until predicate holds or the request is over."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate() or self.done, timeout=max(timeout, 0))

    def follow(self, cancel: threading.Event | None = None,
               poll_s: float = 0.05) -> Iterator[CloudToken]:
        """Each token as it arrives, until the request is over (or cancel is set)."""
        index = 0
        while True:
            self.wait_until(lambda seen=index: len(self.tokens) > seen, poll_s)
            while index < len(self.tokens):
                yield self.tokens[index]
                index += 1
            if self.done and index >= len(self.tokens):
                return
            if cancel is not None and cancel.is_set():
                self.cancel()
                return

    def cancel(self) -> None:
        self._cancelled.set()
        response = self._response
        if response is None:
            return  # still waiting for headers: the thread sees the flag when they come
        with contextlib.suppress(Exception):  # a broken connection may refuse either step
            # Closing the response does not wake a thread blocked reading a stalled
            # socket; shutting the socket down does.
            network = response.extensions.get("network_stream")
            sock = network.get_extra_info("socket") if network is not None else None
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            response.close()

    def _add(self, text: bytes, top: list[tuple[bytes, float]], chosen_logprob: float) -> None:
        if not any(candidate == text for candidate, _ in top):
            top.append((text, chosen_logprob))
        if self.strip_leading and not self.text:
            # "Assistant:" is followed by a space the local reply does not start with.
            text = text.lstrip()
            top = [(c.lstrip(), lp) for c, lp in top if c.strip()]
            if not text:
                return
        with self._cond:
            self.tokens.append(CloudToken(len(self.text), text, tuple(top)))
            self.text += text
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self._cond.notify_all()

    def _finish(self, outcome: str, error: str = "", finished: bool = False) -> None:
        with self._cond:
            self.finished = finished
            self.error = error
            self.outcome = outcome
            self._cond.notify_all()


class CloudClient:
    """Starts streams against one target; shared between replies (connections are reused)
    and between threads. The SDK is imported and set up off the reply's critical path."""

    def __init__(self, target: CloudTarget) -> None:
        self.target = target
        self._client: Any = None
        self._client_lock = threading.Lock()

    def _sdk(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import httpx2
                import openai

                self._client = openai.OpenAI(
                    base_url=self.target.base_url, api_key=self.target.api_key or "none",
                    max_retries=0, timeout=httpx2.Timeout(self.target.timeout_s,
                                                          connect=min(5.0, self.target.timeout_s)))
            return self._client

    def warm(self) -> None:
        """Import and build the SDK client now (about 0.3 s of Python), not mid-reply."""
        self._sdk()

    def stream(self, messages: list[dict[str, str]], prefix: str, *, max_tokens: int = 512,
               recorder: Recorder | None = None) -> CloudStream:
        """Continue the (already redacted) conversation from the reply prefix."""
        target = self.target
        if target.api == "chat":
            chat = list(messages) + ([{"role": "assistant", "content": prefix}] if prefix else [])
            request = {"model": target.model, "messages": chat, "stream": True,
                       "max_tokens": max_tokens, "logprobs": True,
                       "top_logprobs": target.top_logprobs, "temperature": 0}
            text_sent = json.dumps(chat, ensure_ascii=False)
        else:
            prompt = render_transcript(messages, prefix)
            request = {"model": target.model, "prompt": prompt, "stream": True,
                       "max_tokens": max_tokens, "logprobs": target.top_logprobs,
                       "temperature": 0, "stop": ["\nUser:"]}
            text_sent = prompt
        stream = CloudStream(target, strip_leading=not prefix)
        stream.entry = LedgerEntry(target.endpoint, target.model, text_sent)
        threading.Thread(target=self._run, args=(stream, request, recorder), daemon=True,
                         name="floe-cloud").start()
        return stream

    def _run(self, stream: CloudStream, request: dict[str, Any],
             recorder: Recorder | None) -> None:
        entry = stream.entry
        assert entry is not None
        # Counted from what is serialized, so it is known before anything is sent.
        entry.bytes_sent = len(json.dumps(request, ensure_ascii=False).encode("utf-8"))
        try:
            done = recorder(entry) if recorder else None
        except Exception as exc:  # unrecorded means unsent: the ledger must hold every byte
            entry.outcome = NOT_SENT
            stream._finish(NOT_SENT, _one_line(exc))
            return
        started = False
        outcome, error, finished = OK, "", False
        try:
            sdk = self._sdk()
            endpoint = sdk.chat.completions if self.target.api == "chat" else sdk.completions
            raw = endpoint.with_raw_response.create(**request)
            stream._response = raw.http_response
            started = True
            if stream._cancelled.is_set():
                raise InterruptedError
            for chunk in raw.parse():
                if stream._cancelled.is_set():
                    raise InterruptedError
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                for text, top, logprob in _chunk_tokens(choice, self.target.api):
                    stream._add(text, top, logprob)
                if choice.finish_reason:
                    finished = True
            entry.bytes_received = raw.http_response.num_bytes_downloaded
        except InterruptedError:
            outcome = CANCELLED
        except Exception as exc:  # every failure becomes an outcome the decoder understands
            if stream._cancelled.is_set():
                outcome = CANCELLED  # closing the response is how a stream is cancelled
            else:
                outcome, error = classify(exc, started), _one_line(exc)
            if stream._response is not None:
                entry.bytes_received = stream._response.num_bytes_downloaded
        entry.outcome = outcome
        stream._finish(outcome, error, finished)
        if done is not None:
            # The app may have closed the database meanwhile: the row then keeps "sending".
            with contextlib.suppress(Exception):
                done(entry)


def _chunk_tokens(choice: Any, api: str) -> list[tuple[bytes, list[tuple[bytes, float]], float]]:
    """(token bytes, top-k alternatives, its logprob) for each token in a streamed chunk."""
    out = []
    logprobs = choice.logprobs
    if api == "chat":
        for item in (logprobs.content or []) if logprobs else []:
            top = [(_token_bytes(t.token, t.bytes), t.logprob) for t in item.top_logprobs or []]
            out.append((_token_bytes(item.token, item.bytes), top, item.logprob))
        if not out and choice.delta and choice.delta.content:
            out.append((choice.delta.content.encode(), [], 0.0))
        return out
    if logprobs is None or not logprobs.tokens:
        return [(choice.text.encode(), [], 0.0)] if choice.text else []
    for i, token in enumerate(logprobs.tokens):
        alternatives = (logprobs.top_logprobs or [])[i] if logprobs.top_logprobs else {}
        top = [(text.encode(), lp) for text, lp in (alternatives or {}).items()]
        chosen = (logprobs.token_logprobs or [0.0] * (i + 1))[i] or 0.0
        out.append((token.encode(), top, chosen))
    return out


def _token_bytes(token: str, raw: list[int] | None) -> bytes:
    return bytes(raw) if raw else token.encode()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
