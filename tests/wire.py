"""A loopback TCP proxy that records every byte a client sends, and a reader of the HTTP
requests in it: how the tests see exactly what a SuperNode uploads."""

from __future__ import annotations

import contextlib
import socket
import threading


class RecordingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.streams: list[bytearray] = []  # one per connection, client -> server
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:  # the SuperLink is down (restarting): the node retries
                client.close()
                continue
            sent = bytearray()
            with self._lock:
                self.streams.append(sent)
            threading.Thread(target=self._pump, args=(client, upstream, sent),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None),
                             daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()

    def requests(self) -> list[tuple[str, bytes]]:
        """(path, body) of every HTTP/1.1 request sent so far."""
        found = []
        with self._lock:
            streams = [bytes(s) for s in self.streams]
        for stream in streams:
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
