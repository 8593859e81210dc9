"""Differential privacy for what a device uploads: clip, add Gaussian noise, account.

The unit of privacy is one user: each round a device sends one update (the change it made
to the shared adapter), clipped to an L2 norm bound C and noised with N(0, (z*C)^2) per
coordinate before it leaves the device (the Gaussian mechanism, noise multiplier z). Rounds
compose; the accountant (Flower's RDP accountant over Google's dp-accounting) turns the
list of z's this device has released under into epsilon at the configured delta, under
add-or-remove-one neighbours and no sampling amplification (a device that joins a round
always uploads). Pure functions; the accountant is imported only when epsilon is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

Arrays = dict[str, np.ndarray]


def l2_norm(arrays: Arrays) -> float:
    """The L2 norm of all arrays taken as one vector."""
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))


def clip(arrays: Arrays, bound: float) -> tuple[Arrays, float]:
    """Scale the update down to norm <= bound (never up); returns it and its norm before."""
    if bound <= 0:
        raise ValueError("the clipping bound must be positive")
    norm = l2_norm(arrays)
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: (a * scale).astype(a.dtype) for k, a in arrays.items()}, norm


def privatize(arrays: Arrays, bound: float, noise_multiplier: float,
              rng: np.random.Generator) -> tuple[Arrays, float]:
    """Clip to `bound`, then add N(0, (noise_multiplier * bound)^2) to every coordinate.

    Returns the noised update and the norm it had before clipping (kept on the device).
    """
    if noise_multiplier < 0:
        raise ValueError("the noise multiplier cannot be negative")
    clipped, norm = clip(arrays, bound)
    std = noise_multiplier * bound
    if std == 0:
        return clipped, norm
    return {k: (a + rng.normal(0.0, std, a.shape)).astype(a.dtype)
            for k, a in clipped.items()}, norm


def epsilon(noise_multipliers: Iterable[float], delta: float) -> float:
    """Epsilon spent at `delta` by Gaussian releases with these noise multipliers.

    Zero releases spend nothing; a release without noise (multiplier 0) spends infinity.
    """
    releases = list(noise_multipliers)
    if not releases:
        return 0.0
    if min(releases) <= 0:
        return math.inf
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=1,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))
    for z in releases:
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=1,
                                                population_size=1))
    return accountant.get_epsilon(delta)
