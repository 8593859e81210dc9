"""Which privacy a federation runs under, and a true sentence about it for every device.

The operator picks a mode at `floe federation serve --privacy`, and whether rounds run
under secure aggregation (`--secure-aggregation`, on by default: secagg.py, the server sees
only a round's sum):

- none: devices clip their change and send it; no DP noise, no formal guarantee.
- central: devices clip and send; the server clips every update again, sums them and adds
  Gaussian noise N(0, (z*C)^2) once to the sum, then divides by the expected number of
  devices (DP-FedAvg with a fixed denominator). Everyone who sees the shared adapter is
  covered by user-level DP; the operator, who sees single updates, is trusted. Needs the
  server to see single updates: not under secure aggregation.
- distributed: under secure aggregation only. Every device adds a share of that noise,
  N(0, (z*C)^2 / t), where t is the fewest devices whose vectors a sum may hold (secagg's
  threshold, enforced on the devices): the sum carries at least the whole noise, and the
  operator sees only the noised sum.
- local: every device adds the noise itself at full strength. In a small federation the
  noise drowns the signal.
- auto (the default): DP (distributed under secure aggregation, else central) when the
  expected devices per round can bear the noise the chosen epsilon needs, otherwise none,
  with the arithmetic in the reason.

"The noise the sum can bear": the noise on the averaged update has norm about
z * C * sqrt(D) / n for D coordinates and n devices, and the largest honest change one
device may make is C. Noise larger than that drowns what devices teach, so DP is used only
when n >= z * sqrt(D) (for SmolLM2's rank-16 shared adapter, D = 737,280: about 860 devices
per round at z = 1). Pure functions; the accountant (dp.epsilon) is imported lazily.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from floe_app.federated import dp

MODES = ("auto", "none", "central", "local", "distributed")
RESOLVED = ("none", "central", "local", "distributed")
# Devices' federation.require: what a device accepts.
REQUIREMENTS = ("any", "formal_dp", "local_dp", "secure_aggregation")

NO_SECURE_AGGREGATION = (
    "distributed DP needs secure aggregation (each device adds a share of the noise and the"
    " operator sees only the sum; without it each update would be nearly bare before the"
    " operator): drop --secure-aggregation off, or use --privacy central or local")
CENTRAL_NEEDS_UPDATES = (
    "central DP has the server clip every single update, which secure aggregation hides"
    " from it: use --privacy distributed (each device adds a share of the noise), or"
    " --secure-aggregation off")


def threshold_for(devices: int) -> int:
    """Shares needed to rebuild a secret: a majority (at least 2). Fewer devices than this
    finishing stops the round; the operator would need as many devices colluding with it
    to unmask one."""
    return max(2, devices // 2 + 1)


@dataclass(frozen=True)
class Policy:
    """A federation's privacy, as the server decided it and every device receives it."""

    mode: str  # "none" | "central" | "local" | "distributed"
    noise_multiplier: float  # z: of the server's noise (central) or each device's (local)
    clip_norm: float
    expected_nodes: int  # devices per round the server waits for (and divides by)
    rounds: int
    delta: float
    epsilon: float  # per user over `rounds` rounds at delta; math.inf without noise
    reason: str  # why this mode: the operator's choice, or auto's arithmetic
    secure_aggregation: bool = False

    @property
    def sum_threshold(self) -> int:
        """Under secure aggregation: the fewest devices whose vectors a round's sum holds."""
        return threshold_for(self.expected_nodes)

    @property
    def device_noise(self) -> float:
        """The multiplier of the noise each device adds before sending (distributed: a
        share, so that any sum of `sum_threshold` of them has the whole noise)."""
        if self.mode == "distributed":
            return self.noise_multiplier / math.sqrt(self.sum_threshold)
        return self.noise_multiplier if self.mode == "local" else 0.0

    @property
    def release_noise(self) -> float:
        """The multiplier of the Gaussian release one device's update is part of (0: none)."""
        return self.noise_multiplier if self.mode != "none" else 0.0

    def record(self) -> dict[str, Any]:
        """The fields of the round's config record (Flower's ConfigRecord values)."""
        return {"privacy": self.mode, "noise-multiplier": self.noise_multiplier,
                "expected-nodes": self.expected_nodes, "planned-rounds": self.rounds,
                "delta": self.delta,
                "epsilon": self.epsilon if math.isfinite(self.epsilon) else -1.0,
                "privacy-reason": self.reason,
                "secure-aggregation": self.secure_aggregation}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Policy:
        """The policy a round's config record describes. A server from before privacy modes
        sent none of these fields: its devices added the noise themselves (local)."""
        mode = str(record.get("privacy", "local"))
        if mode not in RESOLVED:
            raise ValueError(f"unknown privacy mode {mode!r}")
        if mode == "distributed" and not record.get("secure-aggregation", False):
            raise ValueError("distributed DP without secure aggregation")
        epsilon = float(record.get("epsilon", -1.0))
        return cls(mode, float(record["noise-multiplier"]), float(record["clip-norm"]),
                   int(record.get("expected-nodes", 0)), int(record.get("planned-rounds", 0)),
                   float(record.get("delta", 1e-5)), epsilon if epsilon >= 0 else math.inf,
                   str(record.get("privacy-reason", "")),
                   bool(record.get("secure-aggregation", False)))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["epsilon"] = self.epsilon if math.isfinite(self.epsilon) else None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Policy:
        data = dict(data)
        data["epsilon"] = math.inf if data.get("epsilon") is None else float(data["epsilon"])
        return cls(**data)


@functools.lru_cache(maxsize=64)
def noise_for(target_epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.5%) whose `rounds` releases spend at most
    `target_epsilon` at `delta`."""
    if target_epsilon <= 0 or rounds < 1:
        raise ValueError("a positive epsilon and at least one round are needed")
    low, high = 0.05, 1.0
    while dp.epsilon([high] * rounds, delta) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"epsilon {target_epsilon:g} is out of reach")
    if dp.epsilon([low] * rounds, delta) <= target_epsilon:
        return low
    while high / low > 1.005:
        middle = math.sqrt(low * high)
        if dp.epsilon([middle] * rounds, delta) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


def devices_needed(noise_multiplier: float, coordinates: int) -> int:
    """Devices per round for the noise on the average to stay below one honest update's
    largest change: z * C * sqrt(D) / n <= C."""
    return max(1, math.ceil(noise_multiplier * math.sqrt(coordinates)))


def choose(requested: str, *, expected_nodes: int, rounds: int, coordinates: int,
           clip_norm: float, target_epsilon: float, delta: float,
           noise_multiplier: float | None = None, secure_aggregation: bool = False) -> Policy:
    """The policy for `requested` (one of MODES). `noise_multiplier` None: the least that
    keeps `rounds` rounds within `target_epsilon`."""
    if requested not in MODES:
        raise ValueError(f"--privacy must be one of {', '.join(MODES)}")
    if requested == "distributed" and not secure_aggregation:
        raise ValueError(NO_SECURE_AGGREGATION)
    if requested == "central" and secure_aggregation:
        raise ValueError(CENTRAL_NEEDS_UPDATES)
    n = max(1, expected_nodes)
    sa = secure_aggregation
    if requested == "none":
        return Policy("none", 0.0, clip_norm, n, rounds, delta, math.inf,
                      "the operator chose no DP noise (--privacy none)", sa)
    z = noise_multiplier if noise_multiplier is not None else noise_for(
        target_epsilon, rounds, delta)
    if z <= 0:
        raise ValueError(f"--privacy {requested} needs a noise multiplier above 0")
    epsilon = dp.epsilon([z] * rounds, delta)
    needed = devices_needed(z, coordinates)
    arithmetic = (f"epsilon {epsilon:.2f} at delta {delta:g} over {rounds} rounds needs noise"
                  f" x{z:.2f}; on the shared adapter's {coordinates:,} coordinates that noise"
                  f" stays below the largest honest update only with {needed:,} or more"
                  f" devices per round, and {n:,} are expected")
    if requested == "auto":
        if n >= needed and sa:
            return Policy("distributed", z, clip_norm, n, rounds, delta, epsilon,
                          f"auto: DP noise added in shares by the devices ({arithmetic})", sa)
        if n >= needed:
            return Policy("central", z, clip_norm, n, rounds, delta, epsilon,
                          f"auto: DP noise added by the server ({arithmetic})")
        return Policy("none", 0.0, clip_norm, n, rounds, delta, math.inf,
                      f"auto: no DP noise ({arithmetic})", sa)
    return Policy(requested, z, clip_norm, n, rounds, delta, epsilon,
                  f"the operator chose --privacy {requested} ({arithmetic})", sa)


def statement(policy: Policy) -> str:
    """One paragraph, true for this federation: what leaves, who sees it, what guarantee."""
    c = f"{policy.clip_norm:g}"
    if policy.mode in ("local", "distributed"):
        share = "a share of " if policy.mode == "distributed" else ""
        noised_here = (f", with {share}Gaussian noise x{policy.device_noise:.2f} added on"
                       " this device")
    else:
        noised_here = ", with no noise added here"
    if policy.secure_aggregation:
        leaves = (f"Each round this device sends the change it made to the shared adapter"
                  f" (clipped to norm {c}{noised_here}; quantized and masked), its rank,"
                  " public keys and encrypted key shares for the other devices; never text.")
        sees = (f"The operator's server sees only the sum of a round's changes from at least"
                f" {policy.sum_threshold} devices (secure aggregation, Flower's SecAgg+),"
                " never one device's, as long as it runs Floe's server as published; other"
                " devices see only the combined adapter.")
    else:
        leaves = (f"Each round this device sends the change it made to the shared adapter"
                  f" (float32 numbers, clipped to norm {c}{noised_here}), its rank and its"
                  " example count; never text.")
        if policy.mode == "local":
            sees = ("The operator's server sees each device's noised change (no secure"
                    " aggregation); other devices see only the combined adapter.")
        else:
            sees = ("The operator's server sees each device's change itself (no secure"
                    " aggregation): the operator is trusted with single updates; other"
                    " devices see only the combined adapter.")
    guarantee = (f"epsilon {policy.epsilon:.2f} at delta {policy.delta:g} per user over"
                 f" {policy.rounds} rounds")
    if policy.mode == "none":
        if policy.reason.startswith("auto"):
            why = policy.reason.split("(", 1)[1].rstrip(")") if "(" in policy.reason else ""
            formal = ("No formal guarantee: this federation is too small for one"
                      + (f" ({why})." if why else "."))
        else:
            formal = "No formal guarantee: the operator runs this federation without DP noise."
    elif policy.mode == "central":
        formal = (f"Formal DP guarantee for everyone who receives the shared adapter:"
                  f" {guarantee} (the server adds noise x{policy.noise_multiplier:.2f} once to"
                  " each round's sum); none against the operator.")
    elif policy.mode == "distributed":
        formal = (f"Formal DP guarantee, against the operator too: {guarantee} (every round's"
                  f" sum carries noise x{policy.noise_multiplier:.2f}, added in shares by the"
                  " devices).")
    else:
        formal = (f"Formal DP guarantee, against the operator too: {guarantee} (noise added"
                  " on every device).")
    return " ".join((leaves, sees, formal))


def remember_policy(data_dir: Path, federation: str, policy: Policy) -> None:
    """The federation's privacy as last received, for `floe sync status` and settings."""
    target = data_dir / "federation-privacy.json"
    tmp = target.with_suffix(".partial")
    tmp.write_text(json.dumps({"federation": federation, "policy": policy.to_json()}))
    tmp.replace(target)


def known_policy(data_dir: Path) -> tuple[str, Policy] | None:
    try:
        saved = json.loads((data_dir / "federation-privacy.json").read_text())
        return str(saved["federation"]), Policy.from_json(saved["policy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
