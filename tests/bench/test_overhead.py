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
            5.0, {
                ("comm.py", 1, "wait"): (1, 1, 0.0, 2.0),
                ("shm_exchange.py", 1, "all_gather"): (1, 1, 0.0, 3.0),
            }
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


@pytest.mark.parametrize("name", ["1f1b", "interleaved-1f1b", "zb-h1", "zb-v"])
def test_the_schedule_order_floor_computes_what_the_stage_order_floor_does(name):
    """Each rank's share, in one process: the floor in the schedule's order (I and W kept apart,
    a first stage's I empty) leaves every stage's weights the same gradients as the floor that
    runs every forward, then every backward."""
    import torch

    from benchmarks.harness.pairs import pair
    from benchmarks.harness.workloads import workload
    from pipefold.runtime.arguments import resolve_schedule
    from pipefold.schedule import Op

    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    layers = work.build_layers(0)
    schedule_pair = pair(name)
    num_microbatches = 4
    schedule = resolve_schedule(schedule_pair.schedule, 2, num_microbatches, schedule_pair.num_virtual)
    assert name not in ("zb-h1", "zb-v") or any(a.op is Op.I for row in schedule.actions for a in row)
    for rank in range(2):
        plain = overhead._PlainSide(work, layers, schedule_pair, rank=rank, num_ranks=2,
                                    num_microbatches=num_microbatches)
        ordered = overhead._ScheduleOrderPlainSide(work, layers, schedule_pair, schedule, rank=rank,
                                                   num_microbatches=num_microbatches)
        plain.step(inputs, targets)
        ordered.step(inputs, targets)
        stages = dict(plain._stages)
        assert sorted(stages) == sorted(ordered._modules)
        for stage, module in ordered._modules.items():
            for (label, mine), theirs in zip(
                module.named_parameters(), stages[stage].parameters(), strict=True
            ):
                assert mine.grad is not None, (name, rank, stage, label)
                torch.testing.assert_close(
                    mine.grad, theirs.grad, msg=f"{name} rank {rank} stage {stage} {label}"
                )
