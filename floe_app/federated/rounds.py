"""The shared adapter across rounds. Pure numpy.

Per module the shared adapter is W = B @ A with A's rows orthonormal (B = U S, A = V^T of
W's SVD). A device of rank r trains the first r columns of B against A's first r rows, A
frozen (FFA-LoRA, Sun et al. 2024): the server can rebuild every device's product exactly,
and ||dB @ A|| = ||dB||, so clipping the uploaded dB clips the change to the weights
themselves. Aggregation is FlexLoRA: the example-weighted sum of every device's B_i @ A_i,
refactored by an SVD into B = U S and orthonormal A. Directions with no weight yet get
fresh orthonormal rows, so devices of higher rank always have something to train.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from floe_app.federated.aggregate import Update

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


def device_product(shared: Shared, delta_b: dict[str, np.ndarray], rank: int) -> Update:
    """A device's adapter, (B0 + dB) against A, from its (noised) change to B."""
    return Update({m: (b[:, :rank] + delta_b[m][:, :rank], a[:rank])
                   for m, (b, a) in shared.items()}, examples=0)


def aggregate(shared: Shared, updates: Iterable[tuple[dict[str, np.ndarray], int, int]],
              seed: int = 0, step: float = 1.0) -> Shared:
    """The next shared adapter from (change to B, device rank, examples) triples.

    FlexLoRA: the example-weighted sum of every device's product, cut to the shared rank R
    by a truncated SVD. Every device's A is a prefix of the shared A, so the sum is
    (sum of w_i * B_i padded to R) @ A: one pass over the updates (they may stream in) and
    one small SVD per module, whatever the number of devices (aggregate.flexlora gives the
    same for factors with nothing in common). The sum has rank <= R: the cut loses nothing.
    `step` < 1 moves only that far from the old adapter towards the average (toward()).
    """
    return toward(shared, mean_b(shared, updates), step, seed)


def mean_b(shared: Shared, updates: Iterable[tuple[dict[str, np.ndarray], int, int]]
           ) -> dict[str, np.ndarray]:
    """The example-weighted average of the devices' B (padded to the shared rank), each
    against the shared A (see aggregate)."""
    sums = {m: np.zeros(b.shape, dtype=np.float64) for m, (b, _) in shared.items()}
    total = 0.0
    for delta, rank, examples in updates:
        if examples < 0:
            raise ValueError("an update cannot have a negative example count")
        total += examples
        for module, (b0, _) in shared.items():
            sums[module][:, :rank] += examples * (b0[:, :rank] + delta[module][:, :rank])
    if total <= 0:
        raise ValueError("updates need a positive total of examples")
    return {module: sums[module] / total for module in shared}


def mean_b_of_sum(shared: Shared, mean_delta: dict[str, np.ndarray], ranks: list[int]
                  ) -> dict[str, np.ndarray]:
    """mean_b with every device counted once, from what secure aggregation yields: the
    average of the devices' changes to B padded to the shared rank, and their ranks."""
    if not ranks:
        raise ValueError("a sum of no updates")
    rank = next(iter(shared.values()))[0].shape[1]
    # Column j of B holds b0's column in the devices of rank > j only (FlexLoRA's products).
    held = np.array([sum(r > j for r in ranks) for j in range(rank)]) / len(ranks)
    return {m: b0.astype(np.float64) * held + mean_delta[m] for m, (b0, _) in shared.items()}


def toward(shared: Shared, new_bs: dict[str, np.ndarray], step: float = 1.0,
           seed: int = 0) -> Shared:
    """The shared adapter moved `step` of the way to B' (given against the shared A):
    W + step * (B' A - W), refactored. A server step below 1 keeps a round's direction at a
    size every device's gate accepts (server learning rate, as in FedOpt)."""
    if not 0.0 < step <= 1.0:
        raise ValueError("a server step is in (0, 1]")
    scaled = {m: b0.astype(np.float64) + step * (new_bs[m] - b0)
              for m, (b0, _) in shared.items()}
    return _refactor(shared, scaled, np.random.default_rng(seed))


def _refactor(shared: Shared, new_bs: dict[str, np.ndarray], rng: np.random.Generator) -> Shared:
    """B' @ A as B = U S and orthonormal A again (B' given at the shared rank)."""
    out: Shared = {}
    for module, (b0, a) in shared.items():
        # A's rows are orthonormal, so the singular values of B' @ A are those of B'.
        u, s, vt = np.linalg.svd(new_bs[module], full_matrices=False)
        live = int((s > 1e-9 * max(float(s[0]), 1e-30)).sum()) if s.size else 0
        new_b = np.zeros(b0.shape)
        new_b[:, :live] = u[:, :live] * s[:live]
        new_a = np.zeros(a.shape)
        new_a[:live] = vt[:live] @ a.astype(np.float64)
        out[module] = (new_b.astype(np.float32),
                       complete_rows(new_a, live, rng).astype(np.float32))
    return out


def central_mean_b(shared: Shared, updates: Iterable[tuple[dict[str, np.ndarray], int]],
                   clip_norm: float, noise_multiplier: float, expected_nodes: int,
                   noise_rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Central DP (DP-FedAvg, fixed denominator): every (change to B, rank) clipped to
    `clip_norm` by the server, summed at the shared rank, N(0, (z * clip_norm)^2) added once
    to every coordinate of the sum, divided by `expected_nodes`, added to B (returned as B'
    against the shared A, for toward()). One device changes the sum by at most clip_norm
    (add or remove one), so each round is a Gaussian mechanism of multiplier z at user
    level; the server step and the SVD after it are post-processing."""
    from floe_app.federated import dp

    if expected_nodes < 1:
        raise ValueError("the expected number of devices must be positive")
    sums = {m: np.zeros(b.shape, dtype=np.float64) for m, (b, _) in shared.items()}
    for delta, rank in updates:
        clipped, _ = dp.clip({m: delta[m][:, :rank].astype(np.float64) for m in shared},
                             clip_norm)
        for module, change in clipped.items():
            sums[module][:, :rank] += change
    std = noise_multiplier * clip_norm
    return {m: shared[m][0].astype(np.float64)
            + (sums[m] + (noise_rng.normal(0.0, std, sums[m].shape) if std else 0.0))
            / expected_nodes for m in shared}


def change_norm(old: Shared, new: Shared) -> float:
    """||W_new - W_old|| over all modules (Frobenius), from the factors: A's rows are
    orthonormal, so ||B1 A1 - B0 A0||^2 = ||B1||^2 + ||B0||^2 - 2 tr(B0^T B1 A1 A0^T)."""
    total = 0.0
    for module, (b0, a0) in old.items():
        b1, a1 = (x.astype(np.float64) for x in new[module])
        b0, a0 = b0.astype(np.float64), a0.astype(np.float64)
        cross = float(np.sum((b0.T @ b1) * (a0 @ a1.T)))
        total += float(np.sum(b1 * b1)) + float(np.sum(b0 * b0)) - 2 * cross
    return float(np.sqrt(max(total, 0.0)))


def norm(shared: Shared) -> float:
    """||W|| over all modules (= ||B||: A's rows are orthonormal)."""
    return float(np.sqrt(sum(float(np.sum(b.astype(np.float64) ** 2))
                             for b, _ in shared.values())))
