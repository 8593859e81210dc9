"""The shared adapter across rounds. Pure numpy.

Per module the shared adapter is W = B @ A with A's rows orthonormal (B = U S, A = V^T of
W's SVD). A device of rank r trains the first r columns of B against A's first r rows, A
frozen (FFA-LoRA, Sun et al. 2024): the server can rebuild every device's product exactly,
and ||dB @ A|| = ||dB||, so clipping the uploaded dB clips the change to the weights
themselves. Aggregation is FlexLoRA: the example-weighted sum of every device's B_i @ A_i,
cut back to the federation's rank by a truncated SVD (aggregate.py). Directions with no
weight yet get fresh orthonormal rows, so devices of higher rank always have something to
train.
"""

from __future__ import annotations

import numpy as np

from floe_app.federated.aggregate import Update, truncate, weighted_product_factors

Factors = tuple[np.ndarray, np.ndarray]
Shared = dict[str, Factors]

# Module name (peft's, without the prefix) -> factor shapes are (out, r) and (r, in).
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_shapes(blocks: int, width: int, n_head: int, n_head_kv: int,
                  targets: tuple[str, ...] = ATTENTION) -> dict[str, tuple[int, int]]:
    """(out, in) of each adapted attention matrix of a llama-style model."""
    kv = width // n_head * n_head_kv
    dims = {"q_proj": (width, width), "k_proj": (kv, width), "v_proj": (kv, width),
            "o_proj": (width, width)}
    return {f"layers.{i}.self_attn.{t}": dims[t] for i in range(blocks) for t in targets}


def model_shapes(metadata: dict[str, str]) -> dict[str, tuple[int, int]]:
    """module_shapes of the model whose GGUF metadata (as llama.cpp reports it) is given."""
    arch = metadata["general.architecture"]
    return module_shapes(*(int(metadata[f"{arch}.{key}"]) for key in (
        "block_count", "embedding_length", "attention.head_count",
        "attention.head_count_kv")))


def complete_rows(a: np.ndarray, filled: int, rng: np.random.Generator) -> np.ndarray:
    """A with rows from `filled` on replaced by random unit rows orthogonal to the others."""
    rank, width = a.shape
    if filled >= rank:
        return a
    fresh = rng.standard_normal((rank - filled, width))
    basis = np.concatenate([a[:filled], fresh]).T
    q, _ = np.linalg.qr(basis)
    out = a.copy()
    out[filled:] = q[:, filled:rank].T
    return out


def initial(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 0) -> Shared:
    """Round one: B = 0, A random with orthonormal rows."""
    rng = np.random.default_rng(seed)
    return {m: (np.zeros((out, rank), np.float32),
                complete_rows(np.zeros((rank, width)), 0, rng).astype(np.float32))
            for m, (out, width) in sorted(shapes.items())}


def device_start(shared: Shared, rank: int) -> Shared:
    """What a device of `rank` trains from: the first `rank` directions."""
    return {m: (b[:, :rank].copy(), a[:rank].copy()) for m, (b, a) in shared.items()}


def rebuild(shared: Shared, delta_b: dict[str, np.ndarray], rank: int) -> Update:
    """A device's adapter from the shared one and its (noised, padded) change to B.

    Columns of the change past the device's rank are noise on padding: dropped.
    """
    return Update({m: (b[:, :rank] + delta_b[m][:, :rank], a[:rank])
                   for m, (b, a) in shared.items()}, examples=0)


def aggregate(updates: list[tuple[Update, int]], rank: int,
              seed: int = 0) -> tuple[Shared, float]:
    """The next shared adapter from (device adapter, examples) pairs, and the share of the
    aggregate's energy (sum of squared singular values) the rank cut keeps."""
    weighted = [Update(u.modules, examples) for u, examples in updates]
    rng = np.random.default_rng(seed)
    out: Shared = {}
    kept = total = 0.0
    for module in weighted[0].modules:
        b, a, s = truncate(*weighted_product_factors(weighted, module), rank)
        r = min(rank, len(s))
        live = int((s[:r] > 1e-9 * max(float(s[0]), 1e-30)).sum()) if r else 0
        # truncate splits S evenly between the factors; move it all into B so that A's rows
        # are orthonormal again.
        root = np.sqrt(s[:live])
        b_out = np.zeros_like(b, dtype=np.float64)
        b_out[:, :live] = b[:, :live] * root
        a_out = np.zeros_like(a, dtype=np.float64)
        a_out[:live] = a[:live] / root[:, None]
        out[module] = (b_out.astype(np.float32),
                       complete_rows(a_out, live, rng).astype(np.float32))
        kept += float(np.sum(s[:r] ** 2))
        total += float(np.sum(s ** 2))
    return out, (kept / total if total > 0 else 1.0)
