"""benchmarks/paper.py: the sweeps of Megatron-LM SC'21's figures run through the planner, pin what
they say they pin, and give finite predictions (a few points of each; the full sweep is the script)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "paper.py"
spec = importlib.util.spec_from_file_location("paper", SCRIPT)
assert spec is not None and spec.loader is not None
paper = importlib.util.module_from_spec(spec)
sys.modules["paper"] = paper  # dataclasses look their module up while the script loads
spec.loader.exec_module(paper)


def _finite(points: dict[object, object]) -> None:
    assert points
    for key, point in points.items():
        assert isinstance(point, paper.Prediction), key
        assert math.isfinite(point.step_s) and point.step_s > 0, key
        assert math.isfinite(point.tflops) and 0 < point.tflops < 312, key  # below the A100's bf16 peak
        assert point.peak_memory > 0, key


def test_figure_sweeps_give_finite_predictions():
    _finite(paper.figure_12(batches=(12, 24)))
    _finite(paper.figure_13(batches=(32,), splits=((8, 8), (16, 4))))
    _finite(paper.figure_16(batches=(128,), microbatches=(1, 2)))
    fig17 = paper.figure_17(batches=(1, 16))
    _finite(fig17)
    # Recomputation costs a forward per backward: the step without it is faster.
    assert fig17[1, "none"].sequences_s > fig17[1, "full"].sequences_s


def test_pinned_configurations_are_the_ones_run():
    # More micro-batches in flight without recomputation: more memory from batch 1 to 16 (m = p).
    fig17 = paper.figure_17(batches=(1, 16))
    assert fig17[16, "none"].peak_memory > fig17[1, "none"].peak_memory
    # tp beyond a node's 8 GPUs is placed across nodes.
    fig13 = paper.figure_13(batches=(32,), splits=((8, 8), (16, 4)))
    assert "tp=8 inside a node" in fig13[32, 8, 8].placed
    assert "tp=16 and pp=4 across nodes" in fig13[32, 16, 4].placed
    # A Table 1 row that runs interleaved with micro-batches of 2 (predict checks the rows it ran).
    row = next(r for r in paper.ROWS if r.name == "145.6B")
    assert math.isfinite(paper.pinned(row).tflops)


def test_figure_16_on_another_files_curve(capsys):
    # The cpu preset's measured table in place of the a100 preset's assumed curve (its largest
    # products fall out of the cache to 60% of peak): the same configurations price otherwise,
    # and the table gets the measured column and verdict.
    hardware = paper.with_curve_of("cpu")
    assert hardware.matmul.table and hardware.devices_per_node == paper.HARDWARE.devices_per_node
    assumed = paper.figure_16(batches=(128,), microbatches=(1, 2))
    measured = paper.figure_16(batches=(128,), microbatches=(1, 2), hardware=hardware)
    _finite(measured)
    assert measured[128, 1].tflops != assumed[128, 1].tflops
    paper.print_figure_16(assumed, assumed, ("cpu", measured))
    out = capsys.readouterr().out
    assert "measured-curve TFLOP/s" in out and "with the measured curve: best" in out
