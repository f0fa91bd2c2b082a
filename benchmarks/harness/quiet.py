"""The machine-quiet gate: how much CPU did *other* processes use during a timing window?

The benchmark ranks measure their own CPU time (`time.process_time`, all threads,
gloo's included); rank 0 reads the machine-wide CPU counters of `/proc/stat` around the
same window. CPU time the machine spent that the ranks did not is someone else's load:

    foreign = max(0, machine_busy - own_cpu) / machine_capacity

where machine_capacity is the total CPU time that passed on all cores (busy + idle).
A window whose foreign share exceeds the gate's threshold is disturbed: it is retaken
up to `max_retries` times and, if it never comes out quiet, kept but flagged.
No torch import.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipefold.errors import ConfigError

__all__ = ["CpuCounters", "QuietGate", "foreign_share", "read_cpu_counters"]

_PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True, slots=True)
class CpuCounters:
    """Machine-wide CPU seconds, summed over cores, since boot."""

    busy_s: float
    total_s: float

    def __sub__(self, earlier: CpuCounters) -> CpuCounters:
        return CpuCounters(self.busy_s - earlier.busy_s, self.total_s - earlier.total_s)


def parse_proc_stat(text: str, ticks_per_s: float) -> CpuCounters:
    """Read the aggregate `cpu` line: user nice system idle iowait irq softirq steal ..."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(value) for value in fields[1:9]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            total = sum(ticks)
            return CpuCounters(busy_s=(total - idle) / ticks_per_s, total_s=total / ticks_per_s)
    raise ValueError("no aggregate 'cpu' line in /proc/stat text")


def read_cpu_counters() -> CpuCounters | None:
    """The machine's CPU counters now, or None where /proc/stat does not exist (not Linux)."""
    try:
        text = _PROC_STAT.read_text()
    except OSError:
        return None
    return parse_proc_stat(text, float(os.sysconf("SC_CLK_TCK")))


def foreign_share(machine: CpuCounters, own_cpu_s: float) -> float:
    """Share of the machine's CPU capacity used by processes other than the benchmark.

    `machine` is the counter difference over the window; `own_cpu_s` the CPU seconds all
    benchmark ranks used in it. /proc/stat counts in ticks (10 ms), so short windows
    carry about a tick of error per core; the result is clamped to [0, 1].
    """
    if machine.total_s <= 0:
        return 0.0
    share = (machine.busy_s - own_cpu_s) / machine.total_s
    return min(1.0, max(0.0, share))


@dataclass(frozen=True)
class QuietGate:
    """Decides whether a timing window was quiet enough to keep."""

    threshold: float = 0.10
    """Largest foreign share of the machine's CPU a kept window may have."""
    max_retries: int = 3
    """How many times a disturbed window is retaken before it is kept, flagged."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(
                f"quiet threshold={self.threshold} must be in (0, 1]; e.g. 0.1 tolerates 10% other load"
            )
        if self.max_retries < 0:
            raise ConfigError(f"quiet max_retries={self.max_retries} must be >= 0")

    def is_quiet(self, share: float) -> bool:
        return share <= self.threshold
