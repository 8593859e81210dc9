"""A real TCP proxy between Floe and the cloud server that injects network faults.

Faults: a one-way delay on every byte in both directions (an emulated round-trip time of
twice the delay, throughput untouched), a response that stalls after N bytes, a connection
reset after N bytes, and an immediate HTTP error status (429, 500) without asking the server.
It also keeps every byte clients send (`sent`), and reads the HTTP requests in them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Faults:
    delay_s: float = 0.0  # one way; the round trip grows by twice this
    stall_after: int | None = None  # response bytes before the stream goes silent
    reset_after: int | None = None  # response bytes before the connection is reset
    status: int | None = None  # answer every request with this HTTP status
    # Given a request's body: an HTTP status to refuse it with, other bytes to send on
    # instead, or None to pass it on. While set, each connection carries one request, so
    # that every request is looked at.
    intercept: Callable[[bytes], int | bytes | None] | None = None


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self.connections = 0
        self.sent: list[bytearray] = []  # per connection, what the client sent upstream
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            # Cancelled handlers leave their pipe tasks behind: sweep until none is left.
            for _ in range(5):
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                if not tasks:
                    break
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        faults = Faults(**vars(self.faults))
        self.connections += 1
        with contextlib.suppress(asyncio.CancelledError):  # closing the proxy cancels us
            await self._serve(reader, writer, faults)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     faults: Faults) -> None:
        try:
            if faults.status is not None:
                await self._answer_status(reader, writer, faults.status)
                return
            if faults.intercept is not None:
                await self._one_request(reader, writer, faults)
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            record = bytearray()
            self.sent.append(record)
            await asyncio.gather(
                self._pipe(reader, up_writer, faults, downstream=None, record=record),
                self._pipe(up_reader, writer, faults, downstream=writer),
                return_exceptions=True)
            up_writer.close()
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        return head, await reader.readexactly(length)

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           faults: Faults) -> None:
        head, body = await self._read_request(reader)
        self.sent.append(bytearray(head + body))
        assert faults.intercept is not None
        verdict = faults.intercept(body)
        if isinstance(verdict, int):
            await self._write_status(writer, verdict)
            return
        body = body if verdict is None else verdict
        lines = [line for line in head.split(b"\r\n") if line and not line.lower().startswith(
            (b"connection:", b"content-length:"))]
        lines.append(f"Content-Length: {len(body)}".encode())
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        up_writer.write(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
        await up_writer.drain()
        while chunk := await up_reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        up_writer.close()

    async def _answer_status(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             status: int) -> None:
        await self._read_request(reader)
        await self._write_status(writer, status)

    @staticmethod
    async def _write_status(writer: asyncio.StreamWriter, status: int) -> None:
        body = json.dumps({"error": {"message": f"injected {status}", "type": "injected",
                                     "code": status}}).encode()
        reason = {401: "Unauthorized", 404: "Not Found", 422: "Unprocessable Entity",
                  429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "Error")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    faults: Faults, downstream: asyncio.StreamWriter | None,
                    record: bytearray | None = None) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            sent = 0
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if downstream is not None and faults.reset_after is not None \
                        and sent + len(chunk) > faults.reset_after:
                    sock = downstream.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    downstream.transport.abort()  # RST, mid-response
                    return
                if downstream is not None and faults.stall_after is not None \
                        and sent + len(chunk) > faults.stall_after:
                    await asyncio.sleep(3600)  # silent, but the connection stays open
                try:
                    writer.write(chunk)
                    await writer.drain()
                except ConnectionError:
                    return  # the other side went away (a cancelled stream): nothing to deliver
                sent += len(chunk)
            with contextlib.suppress(Exception):
                writer.write_eof()

        task = asyncio.ensure_future(deliver())
        try:
            while chunk := await reader.read(65536):
                if record is not None:
                    record += chunk
                queue.put_nowait((time.monotonic() + faults.delay_s, chunk))
        finally:
            queue.put_nowait((0.0, b""))
        await task

    def requests(self) -> list[tuple[str, bytes]]:
        """(path, body) of every complete HTTP/1.1 request clients sent so far."""
        found = []
        for stream in [bytes(s) for s in list(self.sent)]:
            at = 0
            while (end := stream.find(b"\r\n\r\n", at)) != -1:
                head = stream[at:end].decode("latin-1").split("\r\n")
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = stream[end + 4:end + 4 + length]
                if len(body) < length:
                    break  # still arriving
                found.append((head[0].split(" ")[1], body))
                at = end + 4 + length
        return found
