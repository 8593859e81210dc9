"""A cloud that streams like a hosted one: recorded OpenAI streams replayed at a chosen pace.

On two cores a local stand-in cloud (llama-cpp-python's server with a 1.5B model on one
thread) streams a few tokens a second, far slower than a hosted cloud, so it cannot show what
fusion's timing settings do. `ReplayCloud` is a small HTTP/1.1 server on 127.0.0.1 that
speaks the OpenAI streaming protocol (POST /v1/chat/completions and /v1/completions, GET
/v1/models). Each request is keyed by the canonical JSON of its body (sorted keys, without
the volatile fields in `VOLATILE`) and its endpoint, and looked up in a recording file (JSON
lines; one entry per request: key, endpoint, request, status and every SSE `data:` payload in
order, raw JSON exactly as it was sent, log-probabilities included):

- recorded: the payloads are replayed with the first token `ttft_ms` after the request and
  then `tokens_per_s`, each chunk paced by the number of tokens it carries (its log-probability
  entries, else one per non-empty text), ending with `data: [DONE]`;
- not recorded and `record=True`: the request goes to the real upstream server, is streamed
  to the client at the upstream's own pace and recorded (completely, even when the client
  hangs up early: a faster replay may read further than the recording client did);
- not recorded and `record=False`: HTTP 404 with an OpenAI-style error whose type is
  `not_recorded`, so a benchmark can say which request it lacks.

Requests with `"stream": false` are forwarded, recorded and replayed the same way, as one
chunk sent when its last token is due. Upstream 4xx answers are recorded too (and replayed at
once); 5xx and connection failures are passed on, never recorded. The upstream serves one
request at a time here (llama-cpp-python's server interrupts a running stream when another
arrives), so forwarded requests queue.

Continuing a partial reply over chat, emulated over the same model. llama.cpp's llama-server,
Ollama and TGI continue a trailing assistant message ("prefill"); vLLM and SGLang do when the
body says `continue_final_message: true, add_generation_prompt: false`. llama-cpp-python's
server does neither (its chat endpoint opens a new assistant turn), so with `prefill_chat=True`
(llama-server style) or for a body with vLLM's two fields (`continue_final=True`, the default)
a chat request whose last message is the assistant's is answered by rendering the conversation
in ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n` for every message but the last, then
`<|im_start|>assistant\\n` + the partial reply, no end marker), sending that to the upstream's
`/v1/completions` (`logprobs` = `top_logprobs`, stop `<|im_end|>`) and turning each legacy chunk
into a chat chunk with `delta.content` and `logprobs.content = [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]`, the shape llama-server, vLLM and OpenAI use. The
deltas carry only the new text (as vLLM; llama-server's first delta also repeats the partial
reply). It is an emulation: the same model and template behind another endpoint, not one of
those servers; what is recorded is the converted chat stream, under a key that names the
emulation.

Use in-process (`ReplayCloud`, a thread with its own event loop) or as a process of its own
(`ReplayProcess`, `python -m tests.support.replay`), which keeps its pacing off the caller's
GIL. Either way `GET /replay/stats` gives its counters and `POST /replay/settings` changes
`ttft_ms`, `tokens_per_s`, `record`, `prefill_chat` and `continue_final` while it runs. It is a
plain TCP server, so the FaultProxy of tests/support/proxy.py can sit in front of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"
# Fields that name the caller rather than change the answer.
VOLATILE = frozenset({"user", "metadata", "store"})
CHATML_END = "<|im_end|>"
# Chat fields that mean the same on the legacy completions endpoint.
SHARED_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                 "stream", "presence_penalty", "frequency_penalty", "repeat_penalty", "n")
SETTINGS = ("ttft_ms", "tokens_per_s", "record", "prefill_chat", "continue_final")
REPO = Path(__file__).resolve().parents[2]


def request_key(endpoint: str, body: dict[str, Any], emulation: str = "",
                volatile: frozenset[str] = VOLATILE) -> str:
    """A stable key for a request: its endpoint, the emulation used and its canonical body."""
    kept = {k: v for k, v in body.items() if k not in volatile}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{endpoint}\n{emulation}\n{canonical}".encode()).hexdigest()


def chunk_tokens(payload: str | dict[str, Any]) -> int:
    """How many generated tokens one streamed chunk carries: its log-probability entries, else
    one per choice with non-empty text."""
    try:
        data = json.loads(payload) if isinstance(payload, str) else payload
    except ValueError:
        return 0
    if not isinstance(data, dict):
        return 0
    count = 0
    for choice in data.get("choices") or []:
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            if isinstance(logprobs.get("content"), list):
                count += len(logprobs["content"])
                continue
            if isinstance(logprobs.get("tokens"), list):
                count += len(logprobs["tokens"])
                continue
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or choice.get("message") or {}).get("content")
        if text:
            count += 1
    return count


def answer_tokens(payload: str) -> int:
    """How many tokens a whole (not streamed) answer carries: its usage, else its chunks."""
    try:
        data = json.loads(payload)
        used = data["usage"]["completion_tokens"]
        if isinstance(used, int):
            return used
    except (ValueError, KeyError, TypeError):
        pass
    return chunk_tokens(payload)


def render_chatml(messages: list[dict[str, Any]]) -> str:
    """ChatML for a conversation whose last message is the partial reply to continue."""
    parts = []
    for message in messages[:-1]:
        parts.append(f"<|im_start|>{message['role']}\n{_text(message.get('content'))}"
                     f"{CHATML_END}\n")
    parts.append(f"<|im_start|>assistant\n{_text(messages[-1].get('content'))}")
    return "".join(parts)


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def completion_body(chat: dict[str, Any]) -> dict[str, Any]:
    """The legacy completions request that continues a chat's trailing assistant message."""
    body = {k: chat[k] for k in SHARED_FIELDS if k in chat}
    if "max_tokens" not in body and "max_completion_tokens" in chat:
        body["max_tokens"] = chat["max_completion_tokens"]
    stop = chat.get("stop") or []
    body["prompt"] = render_chatml(chat["messages"])
    body["stop"] = [CHATML_END, *([stop] if isinstance(stop, str) else stop)]
    if chat.get("logprobs"):
        body["logprobs"] = max(1, int(chat.get("top_logprobs") or 0))
    return body


def content_logprobs(legacy: dict[str, Any] | None, top_n: int) -> list[dict[str, Any]]:
    """Legacy log-probabilities (`tokens`, `token_logprobs`, `top_logprobs` dicts) as a chat
    `logprobs.content` list. `bytes` is the UTF-8 of the token text as the server gave it."""
    if not isinstance(legacy, dict):
        return []
    tokens = legacy.get("tokens") or []
    chosen = legacy.get("token_logprobs") or []
    tops = legacy.get("top_logprobs") or []
    items = []
    for i, token in enumerate(tokens):
        alternatives = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        best = sorted(alternatives.items(), key=lambda kv: -kv[1])[:top_n]
        items.append({"token": token, "logprob": chosen[i] if i < len(chosen) else None,
                      "bytes": list(token.encode()),
                      "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                       for t, lp in best]})
    return items


class ChatFromCompletion:
    """Turns a legacy completions stream (or answer) into the chat completions shape."""

    def __init__(self, chat: dict[str, Any]) -> None:
        self.logprobs = bool(chat.get("logprobs"))
        self.top_n = int(chat.get("top_logprobs") or 0)
        self.started = False

    def _head(self, data: dict[str, Any], obj: str) -> dict[str, Any]:
        ident = str(data.get("id", ""))
        return {"id": "chatcmpl-" + ident.removeprefix("cmpl-"), "object": obj,
                "created": data.get("created", int(time.time())), "model": data.get("model")}

    def chunks(self, payload: str) -> list[str]:
        data = json.loads(payload)
        head = self._head(data, "chat.completion.chunk")
        out = []
        if not self.started:
            self.started = True
            out.append({**head, "choices": [{"index": 0, "logprobs": None, "finish_reason": None,
                                             "delta": {"role": "assistant", "content": ""}}]})
        for choice in data.get("choices") or []:
            text = choice.get("text") or ""
            content = content_logprobs(choice.get("logprobs"), self.top_n) \
                if self.logprobs else []
            if text or content:
                out.append({**head, "choices": [{
                    "index": choice.get("index", 0), "delta": {"content": text},
                    "logprobs": {"content": content} if self.logprobs else None,
                    "finish_reason": None}]})
            if choice.get("finish_reason"):
                out.append({**head, "choices": [{
                    "index": choice.get("index", 0), "delta": {}, "logprobs": None,
                    "finish_reason": choice["finish_reason"]}]})
        if data.get("usage"):
            out.append({**head, "choices": [], "usage": data["usage"]})
        return [json.dumps(c, ensure_ascii=False) for c in out]

    def answer(self, payload: str) -> str:
        data = json.loads(payload)
        choices = []
        for choice in data.get("choices") or []:
            content = content_logprobs(choice.get("logprobs"), self.top_n)
            choices.append({"index": choice.get("index", 0),
                            "message": {"role": "assistant", "content": choice.get("text", "")},
                            "logprobs": {"content": content} if self.logprobs else None,
                            "finish_reason": choice.get("finish_reason")})
        return json.dumps({**self._head(data, "chat.completion"), "choices": choices,
                           "usage": data.get("usage")}, ensure_ascii=False)


@dataclass
class Entry:
    key: str
    endpoint: str
    request: dict[str, Any]
    chunks: list[str]  # SSE data payloads in order (no [DONE]); one whole body if not streamed
    stream: bool = True
    status: int = 200
    emulation: str = ""
    upstream: dict[str, Any] = field(default_factory=dict)  # what went upstream, and its timing


class Recording:
    """The JSON-lines file of recorded requests; entries are appended as they complete."""

    def __init__(self, path: Path | str | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        entry = Entry(**json.loads(line))
                    except (ValueError, TypeError):
                        continue  # a torn last line from an interrupted run
                    self.entries[entry.key] = entry

    def get(self, key: str) -> Entry | None:
        return self.entries.get(key)

    def add(self, entry: Entry) -> None:
        with self._lock:
            self.entries[entry.key] = entry
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(asdict(entry), ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self.entries)


class _Gone(Exception):
    """The client hung up."""


class ReplayCloud:
    """The replaying (and recording) server, in a thread of this process."""

    def __init__(self, recording: Path | str | None, upstream: str | None = None, *,
                 ttft_ms: float = 400.0, tokens_per_s: float = 80.0, record: bool = True,
                 prefill_chat: bool = False, continue_final: bool = True,
                 host: str = "127.0.0.1", port: int = 0,
                 volatile: frozenset[str] = VOLATILE) -> None:
        self.recording = Recording(recording)
        # Upstream base URL as OpenAI clients take it (ending in /v1), or None: replay only.
        self.upstream = upstream.rstrip("/").removesuffix("/v1") if upstream else None
        self.ttft_ms = ttft_ms
        self.tokens_per_s = tokens_per_s
        self.record = record
        self.prefill_chat = prefill_chat
        self.continue_final = continue_final
        self.volatile = volatile
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, str]] = []  # (endpoint, key, outcome) per request
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(host, port, ready),
                                        daemon=True, name="replay-cloud")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("replay server did not start")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def stats(self) -> dict[str, Any]:
        return {**self.settings(), "recorded_entries": len(self.recording),
                **{k: self.counts.get(k, 0) for k in
                   ("requests", "replayed", "forwarded", "recorded", "not_recorded",
                    "emulated", "errors")}}

    def settings(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SETTINGS}

    def configure(self, **settings: Any) -> None:
        for name, value in settings.items():
            if name not in SETTINGS:
                raise TypeError(f"unknown replay setting {name!r}")
            setattr(self, name, value)

    def reset_counts(self) -> None:
        self.counts.clear()
        self.log.clear()

    def __enter__(self) -> ReplayCloud:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the server -----------------------------------------------------------------------

    def _run(self, host: str, port: int, ready: threading.Event) -> None:
        import httpx

        asyncio.set_event_loop(self._loop)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))
        self._upstream_lock = asyncio.Lock()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, host, port))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for _ in range(5):
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await self._client.aclose()

        if not self._loop.is_running():
            return
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                raw = await reader.readexactly(length) if length else b""
                await self._dispatch(method, target.split("?")[0], raw, writer)
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, _Gone):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _dispatch(self, method: str, path: str, raw: bytes,
                        writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path == "/replay/stats":
            return await self._json(writer, 200, self.stats)
        if method == "POST" and path == "/replay/settings":
            try:
                self.configure(**json.loads(raw or b"{}"))
            except (TypeError, ValueError) as exc:
                return await self._json(writer, 400, _error(str(exc), "invalid_request_error"))
            return await self._json(writer, 200, self.stats)
        if method == "GET" and path == MODELS:
            return await self._models(writer)
        if method != "POST" or path not in (CHAT, COMPLETIONS):
            return await self._json(writer, 404, _error(f"no route {method} {path}",
                                                        "invalid_request_error"))
        try:
            body = json.loads(raw)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return await self._json(writer, 400, _error("the body is not a JSON object",
                                                        "invalid_request_error"))
        self.counts["requests"] += 1
        emulation = self._emulation(path, body)
        key = request_key(path, body, emulation, self.volatile)
        entry = self.recording.get(key)
        if entry is not None:
            self.counts["replayed"] += 1
            self.log.append((path, key, "replayed"))
            return await self._replay(entry, writer)
        if not self.record or self.upstream is None:
            self.counts["not_recorded"] += 1
            self.log.append((path, key, "not_recorded"))
            return await self._json(writer, 404, _error(
                f"request not recorded (key {key[:16]}, {path})", "not_recorded",
                code="not_recorded"))
        self.counts["forwarded"] += 1
        self.log.append((path, key, "forwarded"))
        if emulation:
            self.counts["emulated"] += 1
        await self._forward(path, body, emulation, key, writer)

    def _emulation(self, path: str, body: dict[str, Any]) -> str:
        messages = body.get("messages")
        if path != CHAT or not isinstance(messages, list) or not messages \
                or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            return ""
        if self.continue_final and body.get("continue_final_message") \
                and body.get("add_generation_prompt") is False:
            return "continue_final"
        if self.prefill_chat:
            return "prefill"
        return ""

    # -- replaying --------------------------------------------------------------------------

    async def _replay(self, entry: Entry, writer: asyncio.StreamWriter) -> None:
        start = time.monotonic()
        first = start + self.ttft_ms / 1000
        rate = self.tokens_per_s

        def due(tokens: int) -> float:
            return first + (max(0, tokens - 1) / rate if rate else 0.0)

        if entry.status != 200:
            return await self._raw(writer, entry.status, entry.chunks[0].encode())
        if not entry.stream:
            await _sleep_until(due(answer_tokens(entry.chunks[0])))
            return await self._raw(writer, 200, entry.chunks[0].encode())
        await self._start_stream(writer)
        tokens = 0
        for payload in entry.chunks:
            tokens += chunk_tokens(payload)
            await _sleep_until(due(tokens))
            await self._event(writer, payload)
        await self._end_stream(writer)

    # -- forwarding and recording -----------------------------------------------------------

    async def _forward(self, path: str, body: dict[str, Any], emulation: str, key: str,
                       writer: asyncio.StreamWriter) -> None:
        convert = ChatFromCompletion(body) if emulation else None
        up_path, up_body = (COMPLETIONS, completion_body(body)) if emulation else (path, body)
        stream = bool(body.get("stream"))
        entry = Entry(key=key, endpoint=path, request=body, chunks=[], stream=stream,
                      emulation=emulation, upstream={"endpoint": up_path} if emulation else {})
        if emulation:
            entry.upstream["request"] = up_body
        client_ok = True
        async with self._upstream_lock:
            start = time.monotonic()
            try:
                async with self._client.stream("POST", self.upstream + up_path,
                                               json=up_body) as response:
                    if response.status_code != 200 or not stream:
                        raw = await response.aread()
                        status = response.status_code
                        text = raw.decode("utf-8", "replace")
                        if status == 200 and convert is not None:
                            text = convert.answer(text)
                        entry.status = status
                        entry.chunks = [text]
                        entry.upstream["total_ms"] = round((time.monotonic() - start) * 1e3, 1)
                        if status < 500:
                            self._keep(entry)
                        else:
                            self.counts["errors"] += 1
                        with contextlib.suppress(ConnectionError, _Gone):
                            await self._raw(writer, status, text.encode())
                        return
                    with contextlib.suppress(ConnectionError, _Gone):
                        await self._start_stream(writer)
                    done = False
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].removeprefix(" ")
                        if payload.strip() == "[DONE]":
                            done = True
                            break
                        payloads = convert.chunks(payload) if convert else [payload]
                        if "first_ms" not in entry.upstream:
                            entry.upstream["first_ms"] = round((time.monotonic() - start) * 1e3,
                                                               1)
                        entry.chunks.extend(payloads)
                        for item in payloads:
                            if client_ok:
                                try:
                                    await self._event(writer, item)
                                except (ConnectionError, _Gone):
                                    client_ok = False  # keep reading: record it whole
                    entry.upstream["total_ms"] = round((time.monotonic() - start) * 1e3, 1)
                    entry.upstream["tokens"] = sum(chunk_tokens(c) for c in entry.chunks)
                    if done:
                        self._keep(entry)
                    else:
                        self.counts["errors"] += 1
            except Exception as exc:  # any upstream failure becomes a 502
                self.counts["errors"] += 1
                if not entry.chunks:
                    with contextlib.suppress(Exception):
                        await self._json(writer, 502, _error(f"upstream failed: {exc!r}",
                                                             "upstream_error"))
                    return
                client_ok = False
        if client_ok:
            with contextlib.suppress(ConnectionError, _Gone):
                await self._end_stream(writer)

    def _keep(self, entry: Entry) -> None:
        self.recording.add(entry)
        self.counts["recorded"] += 1

    async def _models(self, writer: asyncio.StreamWriter) -> None:
        if self.upstream is not None:
            try:
                response = await self._client.get(self.upstream + MODELS)
                return await self._raw(writer, response.status_code, response.content)
            except Exception:  # fall back to what the recording names
                pass
        names = sorted({str(e.request.get("model")) for e in self.recording.entries.values()})
        await self._json(writer, 200, {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": "replay"} for name in names]})

    # -- HTTP/1.1 writing --------------------------------------------------------------------

    async def _json(self, writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
        await self._raw(writer, status, json.dumps(obj).encode())

    async def _raw(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                  502: "Bad Gateway"}.get(status, "Status")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await _drain(writer)

    async def _start_stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
                     b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        await _drain(writer)

    async def _event(self, writer: asyncio.StreamWriter, payload: str) -> None:
        data = f"data: {payload}\r\n\r\n".encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await _drain(writer)

    async def _end_stream(self, writer: asyncio.StreamWriter) -> None:
        await self._event(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        await _drain(writer)


async def _drain(writer: asyncio.StreamWriter) -> None:
    if writer.is_closing():
        raise _Gone
    await writer.drain()


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))


def _error(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ReplayProcess:
    """`ReplayCloud` in a process of its own, driven over its /replay/* routes."""

    def __init__(self, recording: Path | str | None, upstream: str | None = None, *,
                 ttft_ms: float = 400.0, tokens_per_s: float = 80.0, record: bool = True,
                 prefill_chat: bool = False, continue_final: bool = True,
                 log: Path | None = None) -> None:
        args = [sys.executable, "-m", "tests.support.replay", "--ttft-ms", str(ttft_ms),
                "--rate", str(tokens_per_s)]
        if recording:
            args += ["--recording", str(recording)]
        if upstream:
            args += ["--upstream", upstream]
        if not record:
            args.append("--no-record")
        if prefill_chat:
            args.append("--prefill-chat")
        if not continue_final:
            args.append("--no-continue-final")
        self._log = open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=self._log, text=True)
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"replay process did not start ({line!r})")
        self.port = int(line)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/replay/stats", timeout=10).json()

    def configure(self, **settings: Any) -> dict[str, Any]:
        import httpx

        response = httpx.post(f"http://127.0.0.1:{self.port}/replay/settings",
                              json=settings, timeout=10)
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> ReplayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Replay (and record) OpenAI streams.")
    parser.add_argument("--recording", help="JSON-lines recording file")
    parser.add_argument("--upstream", help="base URL of the real server, ending in /v1")
    parser.add_argument("--ttft-ms", type=float, default=400.0)
    parser.add_argument("--rate", type=float, default=80.0, help="tokens per second")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--prefill-chat", action="store_true")
    parser.add_argument("--no-continue-final", action="store_true")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    cloud = ReplayCloud(args.recording, args.upstream, ttft_ms=args.ttft_ms,
                        tokens_per_s=args.rate, record=not args.no_record,
                        prefill_chat=args.prefill_chat,
                        continue_final=not args.no_continue_final, port=args.port)
    print(cloud.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        cloud.close()


if __name__ == "__main__":
    main()
