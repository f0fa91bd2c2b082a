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


def test_breakdown_splits_the_cpu_and_compares_handlers_that_waited():
    ops = [
        {"F": [0.010, 40], "B~": [0.012, 10], "B": [0.030, 30], "SEND_F": [0.002, 40], "RECV_B": [0.001, 40]},
        {"F": [0.010, 40], "B": [0.040, 40], "SEND_F": [0.002, 40], "RECV_B": [0.001, 40]},
    ]
    rank = _rank([(0.06, 0.06), (0.06, 0.06)], [(0.05, 0.05)] * 2, [(0.05, 0.05)] * 2,
                 [(10, 0.01, 0.003), (0, 0.0, 0.0)], actions=80, receives=40)
    entry = wait_share.summarize({"gpipe": [(*rank, ops)]})["gpipe"]["ranks"][0]
    # Step 1: compute 0.052, messages 0.003, pipefold less waits 0.057; step 2: 0.050, 0.003, 0.060.
    assert entry["compute_handlers_cpu_us"] == pytest.approx(0.051 / 80 * 1e6)
    assert entry["message_handlers_cpu_us"] == pytest.approx(0.003 / 80 * 1e6)
    assert entry["rest_cpu_us"] == pytest.approx((0.002 + 0.007) / 2 / 80 * 1e6)
    # B: 10 calls that waited at 1200 µs, 70 that did not at 1000 µs; F never waited.
    assert entry["compute_by_wait"]["B"] == pytest.approx([1200.0, 10, 1000.0, 70])
    assert entry["compute_by_wait"]["F"] == pytest.approx([0.0, 0, 250.0, 80])
