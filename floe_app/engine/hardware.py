"""What the CPU can do, and which llama.cpp workarounds that calls for."""

from __future__ import annotations

import os
import threading
import time
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


# Threads for a busy computer. llama.cpp's threads wait for each other at every layer by
# spinning, so one that loses its core to another program stalls all of them: on 2 cores
# with one other busy process, 2 threads decoded at half the speed of 1. So the thread
# count follows what other programs leave free, measured from /proc/stat.

SAMPLE_S = 0.25  # how often the background sampler reads the CPU counters
WINDOW_S = 1.0  # the span free cores are averaged over
# A thread only pays off on a core that is at least this free (others use < 1 - this).
CORE_FREE_ENOUGH = 0.75


@dataclass(frozen=True)
class CpuTimes:
    at: float  # monotonic seconds
    busy: float  # CPU-seconds every program has used, all cores together
    own: float  # CPU-seconds this process used, minus the threads counted as others
    registered: float = 0.0  # CPU-seconds of those threads (the chat's UI thread)


def _clock_ticks() -> int:
    try:
        return os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 100


def _thread_seconds(tid: int, ticks: int) -> float:
    try:
        text = Path(f"/proc/self/task/{tid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / ticks


def parse_proc_stat(text: str, ticks: int) -> tuple[float, int]:
    """Busy CPU-seconds over all cores and the number of cores, from /proc/stat."""
    busy, cores = 0.0, 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:9]]
            # user nice system idle iowait irq softirq steal: idle and iowait are free.
            busy = (sum(values) - values[3] - values[4]) / ticks
        elif line.startswith("cpu"):
            cores += 1
    return busy, cores


class CpuMonitor:
    """How many cores other programs leave free, averaged over the last second.

    "Other" is every other process, plus this process's threads registered with
    `count_as_other` (the chat window's UI thread): llama.cpp's threads compete with them
    just the same.
    """

    def __init__(self) -> None:
        self._ticks = _clock_ticks()
        self._samples: list[CpuTimes] = []
        self._lock = threading.Lock()
        self._others: set[int] = set()
        self._thread: threading.Thread | None = None
        self.cores = cpu_info().logical_cores
        self.available = self.read() is not None

    def count_as_other(self, native_thread_id: int) -> None:
        self._others.add(native_thread_id)

    def read(self) -> CpuTimes | None:
        try:
            text = Path("/proc/stat").read_text()
        except OSError:
            return None
        busy, cores = parse_proc_stat(text, self._ticks)
        if cores:
            self.cores = min(cores, cpu_info().logical_cores)
        times = os.times()
        registered = sum(_thread_seconds(t, self._ticks) for t in self._others)
        return CpuTimes(time.monotonic(), busy, times.user + times.system - registered,
                        registered)

    def start(self) -> None:
        """Sample in the background (a few microseconds every SAMPLE_S), so the first
        decision of a reply already knows the last second."""
        with self._lock:
            if self._thread is not None or not self.available:
                return
            self._thread = threading.Thread(target=self._run, name="floe-cpu-monitor",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self.sample()
            time.sleep(SAMPLE_S)

    def sample(self) -> CpuTimes | None:
        now = self.read()
        if now is not None:
            with self._lock:
                self._samples.append(now)
                del self._samples[:-int(WINDOW_S / SAMPLE_S) - 2]
        return now

    def free_cores(self, registered_since: float = float("-inf")) -> float | None:
        """Cores not used by other programs over about the last WINDOW_S (None: unknown).
        This process's registered threads count only from `registered_since` (monotonic
        seconds) on, at their rate since then: the chat's UI thread is busy showing the
        message that asked for a reply, work that ends as the reply starts."""
        now = self.read()
        if now is None:
            return None
        with self._lock:
            older = [s for s in self._samples if now.at - s.at >= 0.1]
            if not older:
                self._samples.append(now)
                return None
            # The newest sample at least WINDOW_S old, else the oldest there is.
            base = next((s for s in reversed(older) if now.at - s.at >= WINDOW_S), older[0])
            since = next((s for s in older if s.at >= registered_since), None)
        span = now.at - base.at
        others = (now.busy - base.busy) - (now.own - base.own)
        if registered_since > base.at:  # registered threads: their rate since, or nothing yet
            others -= now.registered - base.registered
            if since is not None:
                others += (now.registered - since.registered) * span / (now.at - since.at)
        others = max(0.0, others) / span
        return max(0.0, self.cores - others)


def threads_for(free_cores: float | None, most: int) -> int:
    """Decode threads for this many free cores: one per core that is free enough."""
    if free_cores is None:
        return most
    return max(1, min(most, int(free_cores + 1 - CORE_FREE_ENOUGH)))


_monitor: CpuMonitor | None = None


def cpu_monitor() -> CpuMonitor:
    """The process's one monitor, sampling in the background from the first call."""
    global _monitor
    if _monitor is None:
        _monitor = CpuMonitor()
        _monitor.start()
    return _monitor
