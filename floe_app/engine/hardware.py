"""What the CPU can do, and which llama.cpp workarounds that calls for."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# Flags worth showing in `floe doctor`: the SIMD levels llama.cpp's kernels use.
REPORTED_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16",
                  "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    logical_cores: int
    physical_cores: int

    @property
    def has_amx(self) -> bool:
        return any(flag.startswith("amx") for flag in self.flags)

    def reported_flags(self) -> list[str]:
        return [f for f in REPORTED_FLAGS if f in self.flags]


def parse_cpuinfo(text: str, logical_cores: int) -> CpuInfo:
    model, flags, cores = "unknown CPU", set(), set()
    physical_id = core_id = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model == "unknown CPU":
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
            cores.add((physical_id, core_id))
    physical = len(cores) or logical_cores
    return CpuInfo(model, frozenset(flags), logical_cores, physical)


@cache
def cpu_info() -> CpuInfo:
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # macOS, Windows: no flags to read, and no AMX to work around.
        import platform

        return CpuInfo(platform.processor() or "unknown CPU", frozenset(), logical or 1,
                       logical or 1)
    return parse_cpuinfo(text, logical or 1)


def default_threads() -> int:
    """One thread per physical core: hyper-threads slow llama.cpp's matmuls down."""
    info = cpu_info()
    return max(1, min(info.physical_cores, info.logical_cores))
