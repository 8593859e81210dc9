"""peft LoRA weights to a GGUF LoRA adapter that llama.cpp loads. numpy and gguf only.

llama.cpp's converter permutes the rows of q_proj and k_proj for its RoPE layout, and
transformers undoes that when it loads a GGUF; so the B factors of q and k, trained against
transformers' layout, are permuted back here. A factors are unaffected (they act on inputs).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# peft module path (transformers' llama naming) -> llama.cpp tensor name
MODULES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
PEFT_KEY = re.compile(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
                      r"\.lora_([AB])(?:\.default)?\.weight$")


@dataclass(frozen=True)
class BaseModel:
    """What an adapter must match: the base's identity (engine.local.base_identity), its
    architecture and its attention head layout."""

    identity: str
    arch: str
    n_head: int
    n_head_kv: int


def rope_permute(b: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k LoRA B factor from transformers' layout to llama.cpp's."""
    rows, rank = b.shape
    return b.reshape(n_heads, 2, rows // n_heads // 2, rank).swapaxes(1, 2).reshape(rows, rank)


def gguf_tensors(state: dict[str, np.ndarray], base: BaseModel) -> dict[str, np.ndarray]:
    """peft state-dict entries as llama.cpp adapter tensors (float32, B permuted for q/k)."""
    tensors = {}
    for key, value in state.items():
        match = PEFT_KEY.search(key)
        if match is None:
            raise ValueError(f"not a LoRA weight of a supported module: {key}")
        block, module, factor = match.groups()
        array = np.ascontiguousarray(np.asarray(value, dtype=np.float32))
        if factor == "B" and module == "self_attn.q_proj":
            array = rope_permute(array, base.n_head)
        elif factor == "B" and module == "self_attn.k_proj":
            array = rope_permute(array, base.n_head_kv)
        tensors[f"blk.{block}.{MODULES[module]}.weight.lora_{factor.lower()}"] = array
    return tensors


def write_gguf_adapter(path: Path, state: dict[str, np.ndarray], *, alpha: float,
                       base: BaseModel) -> Path:
    """Write the adapter atomically: a crash leaves the old file or none, never half of one."""
    import gguf

    tensors = gguf_tensors(state, base)  # refuses bad input before a file is touched
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        writer = gguf.GGUFWriter(str(tmp), base.arch)
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        writer.add_string("floe.base_model", base.identity)
        for name, array in sorted(tensors.items()):
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # disk full, killed: nothing half-written stays behind
        raise
    return path
