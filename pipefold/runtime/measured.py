"""From a measured timeline back to a cost model, so the simulator can replay what ran.

    pipe.step(inputs, targets)
    costs = measured_cost_model(pipe.last_timeline, pipe.schedule)
    predicted = simulate(pipe.schedule, costs)     # compare with pipe.last_timeline

Per stage, each op's time is the mean duration of its events. A schedule that never
splits the backward measures only B; I and W are then taken as half of B each, so
`b = i + w` holds. Activation bytes per stage are estimated from each rank's measured
peak, divided by the most micro-batch activations that rank held at once and shared
evenly among its stages (the hooks count bytes per rank, not per stage).
"""

from __future__ import annotations

from collections import defaultdict

from pipefold.errors import CostModelError
from pipefold.schedule import Op, Schedule
from pipefold.simulate import CostModel
from pipefold.timeline import Timeline

__all__ = ["measured_cost_model"]


def measured_cost_model(timeline: Timeline, schedule: Schedule) -> CostModel:
    """A `CostModel` whose per-stage times are the mean measured durations in `timeline`."""
    if timeline.num_ranks != schedule.num_ranks:
        raise CostModelError(
            f"timeline has {timeline.num_ranks} ranks but schedule {schedule.name!r} has "
            f"{schedule.num_ranks}; pass the schedule the timeline was measured with"
        )
    durations: dict[tuple[Op, int], list[float]] = defaultdict(list)
    for row in timeline.events:
        for event in row:
            durations[(event.action.op, event.action.stage)].append(event.duration)

    def mean(op: Op, stage: int) -> float | None:
        values = durations.get((op, stage))
        return sum(values) / len(values) if values else None

    f, i, w, b, step = [], [], [], [], []
    for stage in range(schedule.num_stages):
        forward = mean(Op.F, stage)
        if forward is None:
            raise CostModelError(
                f"timeline has no F event of stage {stage}; measure a full step of {schedule.name!r}"
            )
        full, inp, weight = mean(Op.B, stage), mean(Op.I, stage), mean(Op.W, stage)
        if inp is None or weight is None:
            if full is None:
                raise CostModelError(f"timeline has no backward (B, or I and W) event of stage {stage}")
            inp = weight = full / 2
        f.append(forward)
        i.append(inp)
        w.append(weight)
        b.append(full if full is not None else inp + weight)
        step.append(mean(Op.STEP, stage) or 0.0)

    activation_bytes = [0] * schedule.num_stages
    for rank, peak_bytes in enumerate(timeline.activation_bytes_peak):
        stages = schedule.stages_of(rank)
        in_flight = max(timeline.peak_activations(rank), 1)
        for stage in stages:
            activation_bytes[stage] = int(peak_bytes / in_flight / len(stages))
    return CostModel.from_lists(f, i, w, b=b, step=step, activation_bytes=activation_bytes)
