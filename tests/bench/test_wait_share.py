"""benchmarks/wait_share.py: the per-action summary of gathered samples (no ranks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "wait_share.py"
spec = importlib.util.spec_from_file_location("wait_share", SCRIPT)
assert spec is not None and spec.loader is not None
wait_share = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wait_share)


def _rank(pipefold, plain, order, waits, actions=100, receives=50):
    """Samples of one rank: (wall s, CPU s) per step of each side, and (count, wall s, CPU s)
    of the waits per pipefold step."""
    return ({"pipefold": pipefold, "plain": plain, "plain-order": order}, waits, actions, receives)


def test_waits_are_taken_out_of_the_cpu_and_the_slowest_rank_is_the_step():
    results = {"1f1b": [
        _rank([(0.05, 0.03), (0.07, 0.04)], [(0.02, 0.02)] * 2, [(0.025, 0.025)] * 2,
              [(10, 0.02, 0.004), (30, 0.03, 0.006)]),
        _rank([(0.06, 0.05), (0.05, 0.05)], [(0.03, 0.03)] * 2, [(0.03, 0.03)] * 2,
              [(0, 0.0, 0.0), (0, 0.0, 0.0)]),
    ]}
    entry = wait_share.summarize(results)["1f1b"]
    # Slowest rank per step: 0.06 and 0.07 -> median 0.065 s over 100 actions.
    assert entry["wall_us"] == pytest.approx(650.0)
    assert entry["wall_over_stage_floor_us"] == pytest.approx(650.0 - 300.0)
    first, second = entry["ranks"]
    assert first["waited"] == 20 and first["waited_share"] == pytest.approx(0.4)
    assert first["wait_wall_us"] == pytest.approx(250.0)
    # Per step CPU less wait CPU: 0.026 and 0.034 -> median 0.030 s -> 300 µs per action.
    assert first["work_cpu_us"] == pytest.approx(300.0)
    assert first["work_over_stage_floor_us"] == pytest.approx(100.0)
    assert first["work_over_schedule_floor_us"] == pytest.approx(50.0)
    assert second["waited_share"] == 0.0 and second["work_over_schedule_floor_us"] == pytest.approx(200.0)
