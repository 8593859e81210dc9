"""Aggregating LoRA updates of different ranks into one shared adapter. Pure numpy.

An update is, per module, factors (B: out x r, A: r x in) with the LoRA scale already
folded into B, and the number of examples it was trained on. Three ways to combine them:

- FlexLoRA (default): the example-weighted sum of each client's B @ A, cut back to each
  client's rank by a truncated SVD (the best rank-r approximation, Eckart-Young).
- HetLoRA: zero-pad every client's factors to the largest rank and average them.
- FedAvg: average the factors; all ranks must be equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Factors = tuple[np.ndarray, np.ndarray]  # (B, A)


@dataclass(frozen=True)
class Update:
    modules: dict[str, Factors]
    examples: int

    @property
    def rank(self) -> int:
        return next(iter(self.modules.values()))[1].shape[0]


def _weights(updates: list[Update]) -> np.ndarray:
    counts = np.array([u.examples for u in updates], dtype=np.float64)
    if not updates or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("updates need a positive total of examples")
    return counts / counts.sum()


def truncate(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """Factors of the best rank-`rank` approximation of b @ a, and all singular values.

    Works on the thin factors (QR, then an SVD of a small matrix), never forming b @ a.
    """
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    new_b = np.zeros((b.shape[0], rank), dtype=b.dtype)
    new_a = np.zeros((rank, a.shape[1]), dtype=a.dtype)
    new_b[:, :r] = (qb @ u[:, :r]) * root
    new_a[:r] = root[:, None] * (vt[:r] @ qa.T)
    return new_b, new_a, s


def weighted_product_factors(updates: list[Update], module: str) -> Factors:
    """Thin factors whose product is the example-weighted sum of every client's B @ A."""
    weights = _weights(updates)
    b = np.concatenate([w * u.modules[module][0] for w, u in zip(weights, updates, strict=True)],
                       axis=1)
    a = np.concatenate([u.modules[module][1] for u in updates], axis=0)
    return b, a


def flexlora(updates: list[Update], ranks: list[int]) -> dict[int, dict[str, Factors]]:
    """The aggregate, cut to each requested rank: {rank: {module: (B, A)}}."""
    result: dict[int, dict[str, Factors]] = {r: {} for r in ranks}
    for module in updates[0].modules:
        b, a = weighted_product_factors(updates, module)
        largest = max(ranks)
        big_b, big_a, _ = truncate(b, a, largest)
        for r in ranks:  # singular directions are ordered: a smaller rank is a prefix
            result[r][module] = (big_b[:, :r].copy(), big_a[:r].copy())
    return result


def hetlora(updates: list[Update]) -> dict[str, Factors]:
    """Zero-pad every client's factors to the largest rank, then average them."""
    weights = _weights(updates)
    top = max(u.rank for u in updates)
    merged = {}
    for module in updates[0].modules:
        b = sum(w * np.pad(u.modules[module][0], ((0, 0), (0, top - u.rank)))
                for w, u in zip(weights, updates, strict=True))
        a = sum(w * np.pad(u.modules[module][1], ((0, top - u.rank), (0, 0)))
                for w, u in zip(weights, updates, strict=True))
        merged[module] = (b, a)
    return merged


def fedavg(updates: list[Update]) -> dict[str, Factors]:
    """Average the factors of equal-rank updates."""
    if len({u.rank for u in updates}) != 1:
        raise ValueError("FedAvg needs updates of one rank; use flexlora or hetlora")
    return hetlora(updates)
