"""The cloud LLM behind any OpenAI-compatible API, streamed with top-k log-probabilities.

A CloudStream reads one request in a background thread, so the local decoder never waits
on the network longer than it chooses to. What the cloud can do (endpoint, alternatives,
continuing a partial reply, prompt format) is its profile (engine/profiles.py): a preset, or
probed once in that same background thread and cached. Failures become one of a few
outcomes the decoder understands. The API key lives in the environment only: it is never
stored, logged or written to the ledger.
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
from floe_app.engine.logprobs import (
    AssembledToken,
    MalformedChunk,
    TokenAssembler,
    parse_chunk,
)
from floe_app.engine.profiles import (
    PREFILL,
    STOPS,
    CloudProfile,
    ProfileCache,
    preset_for,
    render_prompt,
    with_settings,
)
from floe_app.errors import one_line

# Outcomes of a request, as the decoder and the ledger see them.
OK = "ok"
AUTH = "auth"  # 401/403: the key is wrong; retrying will not help
RATE_LIMITED = "rate_limited"  # 429
SERVER_ERROR = "server_error"  # 5xx
UNSUPPORTED = "unsupported"  # 400/404/422: the endpoint refuses the request or the model
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"  # connection refused or reset before a response
BROKEN = "broken_stream"  # the response started, then broke off
MALFORMED = "malformed"  # a chunk no known server sends
CANCELLED = "cancelled"
NOT_SENT = "not_sent"  # the ledger could not record the request, so it was not sent

# Request fields the openai SDK takes as arguments; any other goes in its extra_body.
SDK_FIELDS = frozenset({"model", "messages", "prompt", "stream", "max_tokens", "temperature",
                        "logprobs", "top_logprobs", "stop"})


@dataclass(frozen=True)
class CloudTarget:
    """Where the cloud is: config, with FLOE_CLOUD_BASE_URL / FLOE_CLOUD_MODEL on top."""

    base_url: str
    model: str
    api_key: str | None = None
    top_logprobs: int = 20
    timeout_s: float = 15.0
    provider: str = "auto"
    endpoint: str = "auto"
    continuation: str = "auto"
    prompt_format: str = "auto"

    @classmethod
    def from_settings(cls, settings: CloudSettings,
                      env: dict[str, str] | None = None) -> CloudTarget | None:
        env = dict(os.environ) if env is None else env
        base_url = env.get("FLOE_CLOUD_BASE_URL") or settings.base_url
        model = env.get("FLOE_CLOUD_MODEL") or settings.model
        if not base_url or not model:
            return None
        return cls(base_url.rstrip("/"), model, env.get(settings.api_key_env),
                   settings.top_logprobs, settings.timeout_s, settings.provider,
                   settings.endpoint, settings.continuation, settings.prompt_format)

    def url(self, endpoint: str) -> str:
        return f"{self.base_url}/{'chat/completions' if endpoint == 'chat' else 'completions'}"


@dataclass
class LedgerEntry:
    """What one request sent, for the privacy ledger (filled in as the request goes)."""

    endpoint: str
    model: str
    text_sent: str
    bytes_sent: int = 0
    bytes_received: int = 0
    outcome: str = ""
    purpose: str = ""  # "" for a reply's request, "probe" for the capability probe


Recorder = Callable[[LedgerEntry], Callable[[LedgerEntry], None]]


def classify(exc: BaseException, started: bool) -> str:
    import httpx2
    import openai

    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return AUTH
    if isinstance(exc, openai.RateLimitError):
        return RATE_LIMITED
    if isinstance(exc, openai.BadRequestError | openai.NotFoundError
                  | openai.UnprocessableEntityError):
        return UNSUPPORTED
    if isinstance(exc, openai.APIStatusError):
        return SERVER_ERROR if exc.status_code >= 500 else UNSUPPORTED
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return TIMEOUT
    if not started and isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return UNREACHABLE
    return BROKEN


class CloudUnavailable(Exception):
    """The cloud cannot be used now; `outcome` is one of the outcomes above."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class CloudStream:
    """One streamed continuation; tokens arrive from a background thread."""

    target: CloudTarget
    prefix: str = ""  # the partial reply the cloud was asked to continue
    logprobs: bool = True  # log-probabilities were asked for
    tokens: list[CloudToken] = field(default_factory=list)
    text: bytes = b""
    finished: bool = False  # the cloud ended its answer itself (not cut at max_tokens)
    outcome: str = ""  # set once the request is over, one of the outcomes above
    error: str = ""
    profile: CloudProfile | None = None  # set when the request is sent
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    entry: LedgerEntry | None = None
    assembler: TokenAssembler = field(default_factory=TokenAssembler)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _response: Any = None

    @property
    def done(self) -> bool:
        return bool(self.outcome)

    @property
    def lacks_logprobs(self) -> bool:
        """It streamed text but no log-probabilities, though they were asked for."""
        return self.logprobs and bool(self.text) and not self.assembler.saw_logprobs

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

    def _add(self, token: AssembledToken) -> None:
        text, top = token.text, list(token.top)
        if token.logprob is not None and not any(c == text for c, _ in top):
            top.append((text, token.logprob))
        if not self.prefix and not self.text:
            # A fresh answer may open with whitespace the local reply does not start with.
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


def build_request(target: CloudTarget, profile: CloudProfile, messages: list[dict[str, str]],
                  prefix: str, max_tokens: int, logprobs: bool) -> tuple[dict[str, Any], str]:
    """The request body for this profile, and the text it sends (for the ledger)."""
    k = profile.top_k if logprobs else 0
    body: dict[str, Any] = {"model": target.model, "stream": True, "max_tokens": max_tokens,
                            "temperature": 0}
    if profile.endpoint == "chat":
        chat = list(messages)
        if prefix and profile.can_continue:
            chat.append({"role": "assistant", "content": prefix})
            body.update(profile.extra)
        body["messages"] = chat
        if k:
            body.update(logprobs=True, top_logprobs=k)
        return body, json.dumps(chat, ensure_ascii=False)
    prompt = render_prompt(profile.prompt_format, messages, prefix)
    body.update(prompt=prompt, stop=STOPS.get(profile.prompt_format, []))
    if k:
        body["logprobs"] = k
    return body, prompt


class CloudClient:
    """Starts streams against one target; shared between replies (connections are reused)
    and between threads. The SDK is imported and set up off the reply's critical path."""

    def __init__(self, target: CloudTarget, cache: ProfileCache | None = None) -> None:
        self.target = target
        self.cache = cache
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._profile: CloudProfile | None = None
        self._profile_lock = threading.Lock()

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

    # The profile

    @property
    def known_profile(self) -> CloudProfile | None:
        """The profile, if known without asking the cloud (preset, cache or earlier probe).
        Never blocks: while a probe runs in the background it is not known yet."""
        if not self._profile_lock.acquire(blocking=False):
            return self._profile
        try:
            if self._profile is None:
                self._profile = self._stored_profile()
            return self._profile
        finally:
            self._profile_lock.release()

    def _stored_profile(self) -> CloudProfile | None:
        t = self.target
        found = preset_for(t.provider, t.base_url)
        if found is None and self.cache is not None:
            found = self.cache.get(t.base_url, t.model)
        if found is None:
            return None
        return with_settings(found, t.endpoint, t.continuation, t.prompt_format, t.model,
                             t.top_logprobs)

    def profile(self, recorder: Recorder | None = None, *, force: bool = False) -> CloudProfile:
        """The profile, probing the cloud if it is not known (or `force`). Raises
        CloudUnavailable when the probe cannot reach or use the cloud."""
        from floe_app.engine.probe import probe

        with self._profile_lock:
            if self._profile is None and not force:
                self._profile = self._stored_profile()
            if self._profile is not None and not force:
                return self._profile
            found = probe(self, recorder)
            if self.cache is not None:
                self.cache.put(self.target.base_url, self.target.model, found)
            t = self.target
            self._profile = with_settings(found, t.endpoint, t.continuation, t.prompt_format,
                                          t.model, t.top_logprobs)
            return self._profile

    def forget_profile(self) -> None:
        """The cloud behaved unlike its profile: probe it again before the next request."""
        with self._profile_lock:
            self._profile = None
            if self.cache is not None:
                self.cache.put(self.target.base_url, self.target.model, None)

    # Requests

    def stream(self, messages: list[dict[str, str]], prefix: str, *, max_tokens: int = 512,
               recorder: Recorder | None = None, logprobs: bool = True,
               purpose: str = "") -> CloudStream:
        """Continue the (already redacted) conversation from the reply prefix; `purpose`
        is what the ledger says the request was for."""
        stream = CloudStream(self.target, prefix=prefix, logprobs=logprobs)
        threading.Thread(target=self._run, args=(stream, messages, max_tokens, recorder,
                                                 purpose),
                         daemon=True, name="floe-cloud").start()
        return stream

    def _run(self, stream: CloudStream, messages: list[dict[str, str]], max_tokens: int,
             recorder: Recorder | None, purpose: str) -> None:
        try:
            profile = self.profile(recorder)
        except CloudUnavailable as exc:
            stream._finish(exc.outcome, str(exc))
            return
        if stream._cancelled.is_set():  # the reply ended while the probe ran
            stream._finish(CANCELLED)
            return
        prefix = stream.prefix if profile.can_continue else ""
        body, text_sent = build_request(self.target, profile, messages, prefix, max_tokens,
                                        stream.logprobs and profile.fusable)
        if profile.continuation == PREFILL and prefix:
            stream.assembler.echo = prefix.encode("utf-8")
        entry = LedgerEntry(self.target.url(profile.endpoint), self.target.model, text_sent,
                            purpose=purpose)
        stream.entry = entry
        # The request leaves now (a first probe may have run before): its clock starts here.
        stream.started_at = time.perf_counter()
        stream.profile = profile
        outcome, error, finished = self.send(
            profile.endpoint, body, entry, recorder, stream._add, assembler=stream.assembler,
            cancelled=stream._cancelled, on_response=lambda r: setattr(stream, "_response", r))
        if outcome == UNSUPPORTED and profile.source in ("probe",):
            self.forget_profile()  # it refused what the probe saw working: look again
        stream._finish(outcome, error, finished)

    def send(self, endpoint: str, body: dict[str, Any], entry: LedgerEntry,
             recorder: Recorder | None, on_token: Callable[[AssembledToken], None], *,
             assembler: TokenAssembler | None = None, cancelled: threading.Event | None = None,
             on_response: Callable[[Any], None] | None = None) -> tuple[str, str, bool]:
        """Send one streamed request, recorded in the ledger first; returns (outcome,
        error, finished). Tokens go to `on_token` as they are assembled."""
        # Counted from what is serialized, so it is known before anything is sent.
        entry.bytes_sent = len(json.dumps(body, ensure_ascii=False).encode("utf-8"))
        try:
            done = recorder(entry) if recorder else None
        except Exception as exc:  # unrecorded means unsent: the ledger must hold every byte
            entry.outcome = NOT_SENT
            return NOT_SENT, one_line(exc), False
        assembler = assembler or TokenAssembler()
        cancelled = cancelled or threading.Event()
        started = False
        outcome, error, finished = OK, "", False
        response = None
        try:
            sdk = self._sdk()
            api = sdk.chat.completions if endpoint == "chat" else sdk.completions
            # The SDK refuses keyword arguments it does not know (vLLM's
            # continue_final_message, say): those travel in extra_body.
            known = {k: v for k, v in body.items() if k in SDK_FIELDS}
            extra = {k: v for k, v in body.items() if k not in SDK_FIELDS}
            raw = api.with_raw_response.create(**known, extra_body=extra or None)
            response = raw.http_response
            if on_response is not None:
                on_response(response)
            started = True
            if cancelled.is_set():
                raise InterruptedError
            for data in _sse_events(response):
                if cancelled.is_set():
                    raise InterruptedError
                chunk = parse_chunk(data)
                if chunk is None:
                    continue
                for token in assembler.feed(chunk):
                    on_token(token)
                if chunk.finish_reason:
                    # Only an answer the cloud ended itself is an end the reply may follow;
                    # "length" means it was cut at max_tokens, mid-thought.
                    finished = chunk.finish_reason != "length"
            for token in assembler.finish():
                on_token(token)
        except InterruptedError:
            outcome = CANCELLED
        except MalformedChunk as exc:
            outcome, error = MALFORMED, f"the cloud sent a chunk Floe cannot read: {exc}"
        except BrokenStreamError as exc:
            outcome, error = BROKEN, f"the cloud reported an error mid-stream: {one_line(exc)}"
        except Exception as exc:  # every failure becomes an outcome the decoder understands
            if cancelled.is_set():
                outcome = CANCELLED  # closing the response is how a stream is cancelled
            else:
                outcome, error = classify(exc, started), one_line(exc)
        if response is not None:
            with contextlib.suppress(Exception):
                entry.bytes_received = response.num_bytes_downloaded
                response.close()
        entry.outcome = outcome
        if done is not None:
            # The app may have closed the database meanwhile: the row then keeps "sending".
            with contextlib.suppress(Exception):
                done(entry)
        return outcome, error, finished


def _sse_events(response: Any) -> Iterator[Any]:
    """The JSON of each `data:` event of a server-sent event stream, until [DONE].

    Read here rather than through the SDK's typed chunks, whose models would reshape
    the log-probability fields some servers send differently.
    """
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise MalformedChunk("an event is not JSON") from exc
        if isinstance(event, dict) and "error" in event and not event.get("choices"):
            message = event["error"].get("message") if isinstance(event["error"], dict) \
                else event["error"]
            raise BrokenStreamError(str(message))
        yield event


class BrokenStreamError(Exception):
    """The server reported an error in the middle of a stream."""

