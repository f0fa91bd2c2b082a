"""benchmarks/overhead.py: cProfile totals charged to the hot path's parts (no ranks, no profiler)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "overhead.py"
spec = importlib.util.spec_from_file_location("overhead", SCRIPT)
assert spec is not None and spec.loader is not None
overhead = importlib.util.module_from_spec(spec)
spec.loader.exec_module(overhead)


def _entry(cumulative, callers=None):
    return (1, 1, 0.0, cumulative, callers or {})


def test_parts_nest_and_the_rest_is_the_executors_own():
    stats = SimpleNamespace(stats={
        ("pipefold/runtime/executor.py", 1, "run"): _entry(10.0),
        ("pipefold/runtime/executor.py", 2, "_complete"): _entry(3.0),
        # waits inside a receive count; the step-end exchange's wait (another caller) does not
        ("pipefold/runtime/failure.py", 3, "wait_until"): _entry(
            5.0, {("comm.py", 1, "wait"): (1, 1, 0.0, 2.0), ("shm_exchange.py", 1, "all_gather"): (1, 1, 0.0, 3.0)}
        ),
        ("pipefold/runtime/backward.py", 4, "backward_full"): _entry(
            4.0, {("executor.py", 5, "_backward"): (1, 1, 0.0, 4.0)}
        ),
        ("torch/autograd/graph.py", 6, "_engine_run_backward"): _entry(3.5),
        ("pipefold/runtime/stage.py", 7, "forward"): _entry(1.0),
        ("torch/nn/modules/linear.py", 8, "forward"): _entry(0.5),  # inside the stage's forward
    })
    parts = overhead._categories(stats, steps=1, actions=1_000_000)
    assert parts["wait (message not yet there)"] == pytest.approx(2.0)
    assert parts["receive (copy out, completion)"] == pytest.approx(1.0)
    assert parts["autograd backward (torch engine)"] == pytest.approx(3.5)
    assert parts["backward entry (pipefold around the engine)"] == pytest.approx(0.5)
    assert parts["layer forward (torch modules)"] == pytest.approx(1.0)
    assert parts[overhead.OTHER] == pytest.approx(10.0 - 2.0 - 1.0 - 3.5 - 0.5 - 1.0)
    assert parts["executor loop, total"] == pytest.approx(10.0)
