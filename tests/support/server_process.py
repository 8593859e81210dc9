"""A real inference server as a subprocess on 127.0.0.1, for tests and benchmarks: started,
waited for until it serves its model, its log's tail in every failure, stopped with the
processes it started."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx2


class ServerProcess:
    """A running server; `base_url` ends in /v1 as OpenAI clients expect."""

    name = "the server"

    def __init__(self, args: Sequence[str], alias: str, port: int, env: dict[str, str],
                 log: Path | None, timeout: float) -> None:
        self.alias = alias
        self.port = port
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.args = list(args)
        self.log_path = log
        self.log = open(log or os.devnull, "w")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(self.args, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}"
                                   f" ({' '.join(self.args)}){self._log_tail()}")
            try:
                # 503 while the model loads; 200 with the alias once it serves.
                answer = httpx2.get(f"{self.base_url}/models", timeout=2)
                if answer.status_code == 200 and self.alias in answer.text:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout:.0f} s"
                           f"{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return ":\n" + "\n".join(lines[-15:])

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop it and every process it started (vLLM starts workers of its own)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()

    def serve_until_interrupted(self) -> None:
        """For `python -m tests.support.X`: keep it running until Ctrl-C, then stop it."""
        try:
            self.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
