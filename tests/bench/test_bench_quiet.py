"""The quiet gate's arithmetic."""

import pytest

from benchmarks.harness.quiet import CpuCounters, QuietGate, foreign_share, parse_proc_stat
from benchmarks.harness.stats import summarize
from pipefold.errors import ConfigError

PROC_STAT = """\
cpu  100 5 50 800 20 3 2 0 0 0
cpu0 50 2 25 400 10 1 1 0 0 0
cpu1 50 3 25 400 10 2 1 0 0 0
intr 12345
"""


def test_parse_proc_stat_counts_idle_and_iowait_as_idle():
    counters = parse_proc_stat(PROC_STAT, ticks_per_s=100)
    assert counters.total_s == pytest.approx(9.8)  # 980 ticks
    assert counters.busy_s == pytest.approx(1.6)  # 100+5+50+3+2


def test_parse_proc_stat_without_cpu_line():
    with pytest.raises(ValueError, match="cpu"):
        parse_proc_stat("intr 1\n", ticks_per_s=100)


def test_counter_difference():
    delta = CpuCounters(5.0, 20.0) - CpuCounters(2.0, 10.0)
    assert delta == CpuCounters(3.0, 10.0)


def test_foreign_share_is_machine_busy_minus_own_over_capacity():
    # 2 cores for 1 s: capacity 2 CPU-s; machine busy 1.5, benchmark used 1.0 -> others 0.5/2.
    assert foreign_share(CpuCounters(busy_s=1.5, total_s=2.0), own_cpu_s=1.0) == pytest.approx(0.25)


def test_foreign_share_clamps_tick_rounding():
    # /proc/stat ticks can undercount the ranks' own CPU time: never below zero.
    assert foreign_share(CpuCounters(busy_s=0.9, total_s=2.0), own_cpu_s=1.0) == 0.0
    assert foreign_share(CpuCounters(busy_s=0.0, total_s=0.0), own_cpu_s=1.0) == 0.0


def test_gate_threshold_is_inclusive():
    gate = QuietGate(threshold=0.1)
    assert gate.is_quiet(0.1)
    assert not gate.is_quiet(0.11)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_gate_refuses_bad_threshold(threshold):
    with pytest.raises(ConfigError, match="threshold"):
        QuietGate(threshold=threshold)


def test_gate_refuses_negative_retries():
    with pytest.raises(ConfigError, match="max_retries"):
        QuietGate(max_retries=-1)


def test_summary_median_and_spread():
    summary = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert summary.median == 3.0
    assert (summary.q25, summary.q75) == (2.0, 4.0)
    assert summary.spread == pytest.approx(2.0 / 3.0)
    assert summarize([2.0]).spread == 0.0
    with pytest.raises(ValueError):
        summarize([])
