"""How big a LoRA this computer trains: a hardware probe and three tiers.

The probe reads cores, memory, accelerators and power without importing torch (it runs in
`floe doctor` and before every background training). The federated rounds rely on tiers
producing adapters of different ranks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from floe_app.config import LearningSettings
from floe_app.engine.hardware import cpu_info

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ATTENTION_AND_MLP = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
# Passes over the examples a run may take, within the tier's budget; training usually
# stops earlier, once the examples are learned (TrainConfig.stop_loss).
EPOCHS = 8


@dataclass(frozen=True)
class Hardware:
    physical_cores: int
    memory_gb: float
    accelerator: str | None  # "cuda", "mps" or None
    on_battery: bool


@dataclass(frozen=True)
class Tier:
    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    max_tokens: int
    batch: int
    min_steps: int
    max_steps: int
    threads: int

    def steps_for(self, examples: int) -> int:
        return max(self.min_steps, min(self.max_steps, math.ceil(EPOCHS * examples / self.batch)))


TIERS = {
    "small": Tier("small", rank=4, alpha=8.0, targets=ATTENTION, max_tokens=96, batch=4,
                  min_steps=40, max_steps=160, threads=2),
    "medium": Tier("medium", rank=8, alpha=16.0, targets=ATTENTION, max_tokens=128, batch=4,
                   min_steps=40, max_steps=300, threads=4),
    "large": Tier("large", rank=16, alpha=32.0, targets=ATTENTION_AND_MLP, max_tokens=256,
                  batch=8, min_steps=40, max_steps=600, threads=8),
}


def probe() -> Hardware:
    info = cpu_info()
    return Hardware(min(info.physical_cores, info.logical_cores), _memory_gb(), _accelerator(),
                    _on_battery())


def choose_tier(hw: Hardware, requested: str = "auto", threads: int = 0) -> tuple[Tier, str]:
    """The tier to train with, and why, in words for `floe doctor`. `threads` (0: the
    tier's) caps the CPU threads training uses."""
    tier, why = _choose(hw, requested)
    return (dataclasses.replace(tier, threads=threads) if threads else tier), why


def tier_for(learning: LearningSettings, requested: str | None = None) -> tuple[Tier, str]:
    """The tier this computer trains at under the learning settings, and why; `requested`
    (floe train --tier) overrides learning.tier."""
    return choose_tier(probe(), requested or learning.tier, learning.threads)


def _choose(hw: Hardware, requested: str) -> tuple[Tier, str]:
    seen = (f"{hw.physical_cores} cores, {hw.memory_gb:.0f} GB memory,"
            f" {hw.accelerator or 'no GPU'}, {'on battery' if hw.on_battery else 'on power'}")
    if requested != "auto":
        tier = TIERS[requested]
        return _fit(tier, hw), f"set in learning.tier ({seen})"
    if hw.on_battery:
        name = "small"
    elif hw.accelerator or (hw.physical_cores >= 8 and hw.memory_gb >= 16):
        name = "large"
    elif hw.physical_cores >= 4 and hw.memory_gb >= 8:
        name = "medium"
    else:
        name = "small"
    return _fit(TIERS[name], hw), seen


def _fit(tier: Tier, hw: Hardware) -> Tier:
    return dataclasses.replace(tier, threads=max(1, min(tier.threads, hw.physical_cores)))


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _accelerator() -> str | None:
    # Seen here without importing torch; the trainer still falls back to the CPU when
    # torch was built without support for it.
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    if Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi"):
        return "cuda"
    return None


def _on_battery(root: Path = Path("/sys/class/power_supply")) -> bool:
    """Linux: a battery discharging and no mains online. Elsewhere: assume on power."""
    try:
        supplies = list(root.iterdir())
    except OSError:
        return False

    def read(supply: Path, name: str) -> str:
        try:
            return (supply / name).read_text().strip()
        except OSError:
            return ""
    mains = any(read(s, "type") == "Mains" and read(s, "online") == "1" for s in supplies)
    discharging = any(read(s, "type") == "Battery" and read(s, "status") == "Discharging"
                      for s in supplies)
    return discharging and not mains
