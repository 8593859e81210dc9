"""Choosing the next token from a distribution: pure functions on numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    max_tokens: int = 512
    seed: int = -1


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Normalized log-probabilities in float64 (float32 loses mass over a 50k vocabulary)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - np.max(x)
    return shifted - np.log(np.exp(shifted).sum())


def sample_token(logprobs: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise top-k, then top-p, then a draw at the temperature."""
    if sampling.temperature <= 0:
        return int(np.argmax(logprobs))
    candidates = np.arange(logprobs.shape[0])
    if 0 < sampling.top_k < logprobs.shape[0]:
        candidates = np.argpartition(logprobs, -sampling.top_k)[-sampling.top_k:]
    scaled = logprobs[candidates] / sampling.temperature
    order = np.argsort(scaled)[::-1]
    candidates, scaled = candidates[order], scaled[order]
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p)) + 1
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    return int(rng.choice(candidates, p=probs))
