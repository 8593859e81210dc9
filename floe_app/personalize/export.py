"""GGUF LoRA adapters for llama.cpp: written from peft weights, read back, composed.
numpy and gguf only (no torch: the chat composes adapters).

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


def peft_factors(state: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A peft state dict as {"layers.{i}.{module}": (B, A)}, in transformers' layout."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = PEFT_KEY.search(key)
        if match is None:
            raise ValueError(f"not a LoRA weight of a supported module: {key}")
        block, module, factor = match.groups()
        parts.setdefault(f"layers.{block}.{module}", {})[factor] = np.asarray(value)
    return {name: (f["B"], f["A"]) for name, f in sorted(parts.items())}


def peft_state(factors: dict[str, tuple[np.ndarray, np.ndarray]],
               like: dict[str, object] | None = None) -> dict[str, np.ndarray]:
    """The inverse of peft_factors; with `like`, keyed as that state dict is."""
    if like is None:
        like = {f"base_model.model.model.{name}.lora_{f}.weight": None
                for name in factors for f in "AB"}
    state = {}
    for key in like:
        match = PEFT_KEY.search(key)
        if match is None:
            raise ValueError(f"not a LoRA weight of a supported module: {key}")
        block, module, factor = match.groups()
        b, a = factors[f"layers.{block}.{module}"]
        state[key] = np.asarray(b if factor == "B" else a, dtype=np.float32)
    return state


def write_gguf_adapter(path: Path, state: dict[str, np.ndarray], *, alpha: float,
                       base: BaseModel) -> Path:
    """Write peft weights as an adapter, atomically (see write_gguf_tensors)."""
    return write_gguf_tensors(path, gguf_tensors(state, base), alpha=alpha, base=base)


def write_gguf_tensors(path: Path, tensors: dict[str, np.ndarray], *, alpha: float,
                       base: BaseModel) -> Path:
    """Write the adapter atomically: a crash leaves the old file or none, never half of one.

    alpha 0 tells llama.cpp to apply every tensor unscaled (composed adapters fold their
    scales into B)."""
    import gguf

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
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
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


@dataclass
class GgufAdapter:
    """An adapter file's tensors (llama.cpp names and layout) and what it was made for."""

    tensors: dict[str, np.ndarray]
    alpha: float
    base_identity: str
    arch: str

    def scaled(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{tensor prefix: (B, A)} with llama.cpp's alpha / rank folded into B."""
        out = {}
        for name, a in self.tensors.items():
            if name.endswith(".lora_a"):
                prefix = name[:-len(".lora_a")]
                b = self.tensors[prefix + ".lora_b"]
                scale = self.alpha / a.shape[0] if self.alpha else 1.0
                out[prefix] = (b * scale, a)
        return out


def _factors_problem(tensors: dict[str, np.ndarray]) -> str | None:
    """Why these tensors are not pairs of finite LoRA factors (A: r x in, B: out x r)."""
    for name, array in tensors.items():
        if not name.endswith((".lora_a", ".lora_b")):
            return f"unexpected tensor {name[:60]!r}"
        other = tensors.get(name[:-1] + ("b" if name.endswith("a") else "a"))
        if other is None:
            return f"{name[:60]!r} has no partner factor"
        if array.ndim != 2 or other.ndim != 2:
            return f"{name[:60]!r} is not a matrix"
        a, b = (array, other) if name.endswith("a") else (other, array)
        if a.shape[0] != b.shape[1] or a.shape[0] == 0:
            return f"{name[:60]!r}: ranks do not match"
        if not np.isfinite(array).all():
            return f"{name[:60]!r} holds NaN or infinite values"
    return None


def read_gguf_adapter(path: Path) -> GgufAdapter:
    """Read an adapter file; ValueError if it is not a LoRA adapter."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))

        def field(key: str) -> object:
            found = reader.get_field(key)
            return None if found is None else found.contents()

        if field("general.type") != "adapter" or field("adapter.type") != "lora":
            raise ValueError(f"{Path(path).name} is not a LoRA adapter")
        # GGUF stores dims innermost first; numpy's shape is the reverse, as written.
        tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(
            tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors}
        problem = _factors_problem(tensors)
        if problem:
            raise ValueError(f"{Path(path).name} is not a usable LoRA adapter: {problem}")
        return GgufAdapter(tensors, float(field("adapter.lora.alpha") or 0.0),
                           str(field("floe.base_model") or ""),
                           str(field("general.architecture") or ""))
    except (OSError, ValueError):
        raise
    except Exception as exc:  # gguf's parser on a damaged file: IndexError, struct errors...
        raise ValueError(f"{Path(path).name} is not a readable GGUF file"
                         f" ({type(exc).__name__}: {exc})") from None


def compose(adapters: list[GgufAdapter]) -> dict[str, np.ndarray]:
    """One adapter equal to applying all of them: ranks stacked, B = [B1 B2], A = [A1; A2],
    each scale folded into its B (write the result with alpha 0)."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for adapter in adapters:
        for prefix, factors in adapter.scaled().items():
            parts.setdefault(prefix, []).append(factors)
    tensors = {}
    for prefix, factors in parts.items():
        tensors[prefix + ".lora_b"] = np.concatenate([b for b, _ in factors], axis=1)
        tensors[prefix + ".lora_a"] = np.concatenate([a for _, a in factors], axis=0)
    return tensors
