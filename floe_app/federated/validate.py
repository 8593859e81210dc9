"""Checks on what crosses the wire, on both sides. Pure: arrays in, a reason (or None) out.

The server refuses an update whose keys, shapes or values are wrong, or whose norm is far
outside the round's; the round goes on with the others. A device refuses a shared adapter
with the wrong shapes, non-finite values or another base model.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]
Shapes = dict[str, tuple[int, ...]]

# An update with a norm this many times the median of the round's others is refused. Honest
# updates under the same clipping bound and noise differ by far less.
OUTLIER_RATIO = 10.0


def arrays_problem(arrays: Arrays, expected: Shapes) -> str | None:
    """Why these arrays are not a well-formed payload of the expected shapes, or None."""
    missing = expected.keys() - arrays.keys()
    extra = arrays.keys() - expected.keys()
    if missing or extra:
        what = []
        if missing:
            what.append(f"{len(missing)} missing (e.g. {sorted(missing)[0]})")
        if extra:  # a name from the other side, shown quoted: it may hold anything
            what.append(f"{len(extra)} unexpected (e.g. {sorted(extra)[0]!r:.60})")
        return "wrong tensors: " + ", ".join(what)
    for key in sorted(expected):
        array = arrays[key]
        if tuple(array.shape) != tuple(expected[key]):
            return f"wrong shape for {key}: {tuple(array.shape)}, expected {expected[key]}"
        if not np.issubdtype(array.dtype, np.floating):
            return f"{key} is not floating point ({array.dtype})"
        if not np.isfinite(array).all():
            return f"{key} holds NaN or infinite values"
    return None


def update_problem(arrays: Arrays, metrics: dict[str, Any],
                   shapes: dict[str, tuple[int, int]], max_rank: int, min_noise: float
                   ) -> tuple[tuple[Arrays, int, int, float] | None, str | None]:
    """A device's reply as (change to B by module, rank, examples, noise multiplier), or
    why the server refuses it."""
    try:
        rank, examples = int(metrics["rank"]), int(metrics["examples"])
        noise = float(metrics["noise-multiplier"])
    except (KeyError, TypeError, ValueError) as exc:
        return None, f"malformed metrics ({type(exc).__name__}: {exc})"
    if not 1 <= rank <= max_rank:
        return None, f"rank {rank} is outside 1..{max_rank}"
    if not 1 <= examples <= 1_000_000:
        return None, f"example count {examples} is out of range"
    if not np.isfinite(noise) or noise < min_noise:
        return None, f"noise multiplier {noise} is below the federation's {min_noise}"
    problem = arrays_problem(arrays, {f"{m}.dB": (out, rank) for m, (out, _) in shapes.items()})
    if problem is not None:
        return None, problem
    return ({m: arrays[f"{m}.dB"] for m in shapes}, rank, examples, noise), None


def norm_outliers(norms: dict[str, float], ratio: float = OUTLIER_RATIO) -> dict[str, str]:
    """Updates to refuse for their norm among three or more: {client: reason} for one above
    `ratio` times the median of the others (the bound clipping and noise allow is checked
    per update, noised_norm_bound)."""
    refused = {}
    for client, norm in norms.items():
        others = [n for c, n in norms.items() if c != client]
        if len(others) >= 2:
            typical = statistics.median(others)
            if typical > 0 and norm > ratio * typical:
                refused[client] = (f"update norm {norm:.3g} is over {ratio:g}x the median"
                                   f" of the others ({typical:.3g})")
    return refused


def noised_norm_bound(clip_norm: float, noise_multiplier: float, coordinates: int) -> float:
    """A norm an honest clipped and noised update stays below (all but ~1e-9 of the time).

    ||clipped + noise|| <= C + ||noise||, and ||noise||^2 / (zC)^2 is chi-squared with
    `coordinates` degrees of freedom: its root stays below sqrt(n) + 6.
    """
    # (1e-3: clipping in float32 lands a hair above the bound.)
    return clip_norm * (1.0 + 1e-3 + noise_multiplier * (np.sqrt(coordinates) + 6.0))


def base_problem(adapter_base: str, local_base: str) -> str | None:
    if adapter_base != local_base:
        return (f"it was made for another base model ({adapter_base or 'unknown'}; this"
                f" device runs {local_base})")
    return None
