"""From measured timelines back to a cost model, so the simulator can replay what ran.

    pipe.step(inputs, targets)
    costs = measured_cost_model(pipe.last_timeline, pipe.schedule)
    predicted = simulate(pipe.schedule, costs)     # compare with pipe.last_timeline
    # Full sharding: pass pipe.running_schedule (with its UNSHARD / REDUCE_GRAD / RESHARD) to both.

Design notes: docs/decisions.md, "measured costs".
"""

from __future__ import annotations

import bisect
import statistics
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Literal

from pipefold.errors import CostModelError
from pipefold.schedule import Action, Op, Schedule
from pipefold.schedule.shard import gather_waits
from pipefold.simulate import CostModel, Link
from pipefold.timeline import Timeline

__all__ = [
    "action_gaps", "event_work", "measured_action_overhead", "measured_cost_model", "measured_gathers",
    "measured_link", "recorded_cores", "trimmed_mean",
]


def _as_list(timelines: Timeline | Sequence[Timeline], schedule: Schedule) -> list[Timeline]:
    found = [timelines] if isinstance(timelines, Timeline) else list(timelines)
    if not found:
        raise CostModelError("no measured timeline given; run at least one step and pass pipe.last_timeline")
    for timeline in found:
        if timeline.num_ranks != schedule.num_ranks:
            raise CostModelError(
                f"timeline has {timeline.num_ranks} ranks but schedule {schedule.name!r} has "
                f"{schedule.num_ranks}; pass the schedule the timeline was measured with"
            )
    return found


def measured_cost_model(
    timelines: Timeline | Sequence[Timeline],
    schedule: Schedule,
    *,
    with_link: bool = True,
    step_times: Sequence[float] | None = None,
    num_cores: float | None | Literal["recorded"] = "recorded",
) -> CostModel:
    """A `CostModel` of the typical measured durations per stage and op, the runtime's
    overheads, and (`with_link`) the measured message latency (see docs/decisions.md, "measured costs").
    `step_times[k]` is the wall time of the step `timelines[k]` recorded. `num_cores`:
    how many ranks could compute at once, by default what the timelines recorded (None:
    a device per rank)."""
    found = _as_list(timelines, schedule)
    if step_times is not None and len(step_times) != len(found):
        raise CostModelError(
            f"got {len(step_times)} step times for {len(found)} timelines; give one wall time per timeline"
        )
    cores = recorded_cores(found) if num_cores == "recorded" else num_cores
    durations: dict[tuple[Op, int], list[float]] = defaultdict(list)
    for timeline in found:
        works = event_work(timeline, cores)
        for row, row_works in zip(timeline.events, works, strict=True):
            for event, work in zip(row, row_works, strict=True):
                durations[(event.action.op, event.action.stage)].append(work)

    def typical(op: Op, stage: int) -> float | None:
        values = durations.get((op, stage))
        return typical_duration(values) if values else None

    f, i, w, b, step = [], [], [], [], []
    for stage in range(schedule.num_stages):
        forward = typical(Op.F, stage)
        if forward is None:
            raise CostModelError(
                f"timeline has no F event of stage {stage}; measure a full step of {schedule.name!r}"
            )
        full, inp, weight = typical(Op.B, stage), typical(Op.I, stage), typical(Op.W, stage)
        if inp is None or weight is None:
            if full is None:
                raise CostModelError(f"timeline has no backward (B, or I and W) event of stage {stage}")
            inp = weight = full / 2
        f.append(forward)
        i.append(inp)
        w.append(weight)
        b.append(full if full is not None else inp + weight)
        step.append(typical(Op.STEP, stage) or 0.0)

    activation_bytes = [0] * schedule.num_stages
    for rank in range(schedule.num_ranks):
        counted = [(t.activation_bytes_peak[rank], t) for t in found if rank < len(t.activation_bytes_peak)]
        if not counted:
            continue
        peak_bytes, timeline = max(counted, key=lambda pair: pair[0])
        stages = schedule.stages_of(rank)
        in_flight = max(timeline.peak_activations(rank), 1)
        for stage in stages:
            activation_bytes[stage] = int(peak_bytes / in_flight / len(stages))
    link = measured_link(found, schedule) if with_link else None
    step_overhead = 0.0
    if step_times:
        step_overhead = max(
            statistics.median(wall - t.makespan for wall, t in zip(step_times, found, strict=True)), 0.0
        )
    gather = measured_gathers(found, schedule)
    return CostModel.from_lists(
        f,
        i,
        w,
        b=b,
        step=step,
        activation_bytes=activation_bytes,
        link=link,
        action_overhead=measured_action_overhead(found),
        step_overhead=step_overhead,
        num_cores=cores,
        gather=[
            typical_duration(gather[stage]) if gather[stage] else 0.0 for stage in range(schedule.num_stages)
        ],
        reduce_scatter=[typical(Op.REDUCE_GRAD, stage) or 0.0 for stage in range(schedule.num_stages)],
    )


def measured_gathers(timelines: Sequence[Timeline], schedule: Schedule) -> dict[int, list[float]]:
    """{stage: seconds of each measured weight gather}, for a schedule with sharding actions
    (`pipe.sharding.schedule(pipe.schedule)`): from an UNSHARD's start to the end of the wait
    of the stage's next compute action, which the executor records first for that action. So
    a gather the look-ahead hid counts whole, as `CostModel.gather` wants it."""
    consumers = {
        row[index]: row[unshard] for row in schedule.actions for index, unshard in gather_waits(row).items()
    }
    found: dict[int, list[float]] = defaultdict(list)
    if not consumers:
        return found
    for timeline in timelines:
        for events, waits in zip(timeline.events, timeline.waits, strict=True):
            started = {(e.step, e.action): e.start for e in events if e.action.op is Op.UNSHARD}
            seen: set[tuple[int, Action]] = set()
            for wait in waits:
                key = (wait.step, wait.waiting_for)
                unshard = consumers.get(wait.waiting_for)
                if unshard is None or key in seen or (wait.step, unshard) not in started:
                    continue
                seen.add(key)
                found[unshard.stage].append(max(wait.end - started[(wait.step, unshard)], 0.0))
    return found


def recorded_cores(timelines: Sequence[Timeline]) -> float | None:
    """The fewest `num_cores` the timelines' meta recorded; None where none did."""
    recorded = [float(t.meta["num_cores"]) for t in timelines if t.meta.get("num_cores") is not None]
    return min(recorded) if recorded else None


def event_work(timeline: Timeline, num_cores: float | None) -> list[list[float]]:
    """Per rank, per event: the seconds of one core's compute each event got (see
    docs/decisions.md, "measured costs", shared cores); its duration where ranks did not share cores
    or the ranks' clocks do not compare."""
    rows = timeline.events
    if num_cores is None or num_cores >= timeline.num_ranks or timeline.meta.get("clock") != "shared":
        return [[event.duration for event in row] for row in rows]
    if not num_cores > 0:
        raise CostModelError(f"num_cores = {num_cores!r}; give a number > 0, or None")
    # Sweep the events' starts and ends once: `share[j]` is the core share each computing
    # rank had between points[j] and points[j + 1], `credit[j]` its integral up to points[j].
    points = sorted({t for row in rows for event in row for t in (event.start, event.end)})
    change = [0] * (len(points) + 1)
    for row in rows:
        for event in row:
            change[bisect.bisect_left(points, event.start)] += 1
            change[bisect.bisect_left(points, event.end)] -= 1
    credit = [0.0]
    computing = 0
    for j in range(len(points) - 1):
        computing += change[j]
        share = min(1.0, num_cores / computing) if computing else 1.0
        credit.append(credit[-1] + share * (points[j + 1] - points[j]))

    def work(start: float, end: float) -> float:
        return credit[bisect.bisect_left(points, end)] - credit[bisect.bisect_left(points, start)]

    return [[work(event.start, event.end) for event in row] for row in rows]


STALL_FACTOR = 3.0
"""An action that took more than this many times its op's median duration stalled."""


def typical_duration(values: Sequence[float]) -> float:
    """The mean of `values` without stalls (above `STALL_FACTOR` x their median)."""
    if not values:
        raise CostModelError("no durations to summarise")
    cut = STALL_FACTOR * statistics.median(values)
    kept = [value for value in values if value <= cut]
    return statistics.fmean(kept)


def action_gaps(timelines: Sequence[Timeline]) -> Iterator[tuple[Action, float]]:
    """Each compute action that a rank's next one follows in the same step, with the gap between
    them: from its end to the next action's start or the start of the wait before it (a wait is
    not the runtime's time)."""
    for timeline in timelines:
        for rank, row in enumerate(timeline.events):
            waited = {(wait.step, wait.waiting_for): wait.start for wait in timeline.waits[rank]}
            for before, after in zip(row, row[1:], strict=False):
                if after.step != before.step:
                    continue
                until = waited.get((after.step, after.action), after.start)
                yield before.action, max(until - before.end, 0.0)


def trimmed_mean(values: Sequence[float]) -> float:
    """The mean without the largest 5% (none below 20 values: a preemption is not a cost); 0
    without values."""
    ordered = sorted(values)
    kept = ordered[: len(ordered) - len(ordered) // 20]
    return sum(kept) / len(kept) if kept else 0.0


def measured_action_overhead(timelines: Sequence[Timeline]) -> float:
    """Mean gap between consecutive compute actions of a rank, not counting waits (see
    docs/decisions.md, "measured costs"), without the largest 5%; 0 when no rank ran two actions."""
    return trimmed_mean([gap for _, gap in action_gaps(timelines)])


def _producers(consumer: Action) -> tuple[Action, ...]:
    """The actions whose output a consumer's received message carries."""
    if consumer.op == Op.F:
        return (Action(Op.F, consumer.stage - 1, consumer.microbatch),) if consumer.stage > 0 else ()
    if consumer.op in (Op.B, Op.I):
        # The output gradient comes from the next stage's whole or input-half backward.
        after = consumer.stage + 1
        return (Action(Op.B, after, consumer.microbatch), Action(Op.I, after, consumer.microbatch))
    return ()


def measured_link(timelines: Timeline | Sequence[Timeline], schedule: Schedule) -> Link | None:
    """The median message latency measured in `timelines` (see docs/decisions.md, "measured costs"), or
    None when no wait shows it or the ranks were not on one clock."""
    samples: list[float] = []
    for timeline in _as_list(timelines, schedule):
        if timeline.meta.get("clock") != "shared":
            continue
        ends: dict[tuple[int, Action], float] = {}
        for row in timeline.events:
            for event in row:
                ends[(event.step, event.action)] = event.end
        for waits in timeline.waits:
            for wait in waits:
                for producer in _producers(wait.waiting_for):
                    end = ends.get((wait.step, producer))
                    if end is None or schedule.placement[producer.stage] == wait.rank:
                        continue
                    if wait.start <= end <= wait.end:
                        samples.append(wait.end - end)
    if not samples:
        return None
    return Link(latency=statistics.median(samples))
