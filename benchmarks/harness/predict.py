"""pipefold's simulator prediction for a benchmark configuration.

Stage costs are sums of the per-layer profile (`benchmarks.harness.profile`) over each
stage's layers. The profile's per-layer timings (a few repeats of single kernels) are
noisier than a whole step, so they are rescaled so that F + B of all layers times M
equals the median of the one-process accumulation baseline for the same M: the profile
gives the shape (which layer, F versus B versus I), the baseline the scale.
No torch import.
"""

from __future__ import annotations

from collections.abc import Sequence

from benchmarks.harness.layout import stage_bounds
from benchmarks.harness.pairs import SchedulePair
from benchmarks.harness.results import LayerCost
from pipefold.schedule import Schedule, build
from pipefold.schedule.lower import fuse_adjacent_split_backward
from pipefold.simulate import CostModel, Link, simulate
from pipefold.timeline import Timeline

__all__ = ["cost_model", "predict"]


def cost_model(
    layer_costs: Sequence[LayerCost],
    num_stages: int,
    *,
    scale: float = 1.0,
    link: Link | None = None,
    num_cores: float | None = None,
) -> CostModel:
    """Per-stage CostModel from per-layer costs, times multiplied by `scale`; `num_cores`
    where the ranks share cores (docs/decisions.md, "shared cores")."""
    bounds = stage_bounds(num_stages)

    def per_stage(values: Sequence[float]) -> list[float]:
        return [scale * sum(values[start:stop]) for start, stop in bounds]

    return CostModel.from_lists(
        f=per_stage([c.forward_s for c in layer_costs]),
        i=per_stage([c.input_grad_s for c in layer_costs]),
        w=per_stage([c.weight_grad_s for c in layer_costs]),
        b=per_stage([c.backward_s for c in layer_costs]),
        activation_bytes=[sum(c.activation_bytes for c in layer_costs[start:stop]) for start, stop in bounds],
        message_bytes=[layer_costs[stop - 1].output_bytes for _, stop in bounds[:-1]],
        link=link,
        num_cores=num_cores,
    )


def calibration_scale(layer_costs: Sequence[LayerCost], num_microbatches: int, baseline_s: float) -> float:
    """Factor that makes the profile's one-process step equal the measured baseline step."""
    profiled = num_microbatches * sum(c.forward_s + c.backward_s for c in layer_costs)
    return baseline_s / profiled if profiled > 0 else 1.0


def predict(
    schedule_pair: SchedulePair,
    num_ranks: int,
    num_microbatches: int,
    layer_costs: Sequence[LayerCost],
    *,
    scale: float = 1.0,
    link: Link | None = None,
    num_cores: float | None = None,
    schedule: Schedule | None = None,
) -> Timeline:
    """The simulated timeline of one step of this configuration; `schedule` is the one that
    ran where it was searched rather than built from the pair's family (auto, auto-v)."""
    if schedule is None:
        schedule = build(
            schedule_pair.schedule,
            num_ranks=num_ranks,
            num_microbatches=num_microbatches,
            num_virtual=schedule_pair.num_virtual,
        )
    # The runtime fuses I/W pairs nobody waits on (RuntimeOptions(fuse_backward=True)); predict that.
    schedule = fuse_adjacent_split_backward(schedule)
    costs = cost_model(layer_costs, schedule.num_stages, scale=scale, link=link, num_cores=num_cores)
    return simulate(schedule, costs)
