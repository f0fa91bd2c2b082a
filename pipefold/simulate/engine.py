"""`simulate(schedule, costs)`: predict a schedule's `Timeline` by discrete events.

It follows the runtime's semantics, one step after another, with or without a barrier
between steps (docs/decisions.md, "Simulated semantics").
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict, deque
from dataclasses import dataclass, replace

from pipefold.errors import ConfigError, ScheduleError
from pipefold.schedule.deps import backward_of, data_inputs
from pipefold.schedule.ir import Action, Schedule, WeightUpdate, format_grid
from pipefold.schedule.shard import gather_waits
from pipefold.simulate.costs import CostModel, sent_boundary
from pipefold.simulate.memory import activation_bytes_peak, weight_versions
from pipefold.timeline import Event, Timeline, Wait

__all__ = ["predicted_step_time", "simulate", "step_end_time"]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """The schedule flattened for speed: every action gets an id (its index in rank-major
    order) so the hot loop indexes lists instead of hashing `Action`s.

    `inputs[id]` holds (producer id, arrival delay) pairs; `after[id]` the seconds the rank
    spends after action `id` before its next action of the step (`CostModel.action_overhead`, and
    the send of its output to another rank where that is priced).
    """

    actions: tuple[tuple[Action, ...], ...]
    first_id: tuple[int, ...]
    durations: tuple[float, ...]
    inputs: tuple[tuple[tuple[int, float], ...], ...]
    after: tuple[float, ...]


def _prepare(schedule: Schedule, costs: CostModel) -> _Prepared:
    backward = backward_of(schedule)
    placement = schedule.placement
    id_of: dict[Action, int] = {}
    first_id = []
    for row in schedule.actions:
        first_id.append(len(id_of))
        for action in row:
            id_of.setdefault(action, len(id_of))
    if len(id_of) != sum(len(row) for row in schedule.actions):
        raise ScheduleError(
            f"{schedule.name or 'schedule'}: an action appears twice; run "
            "pipefold.schedule.validate(schedule) to find it"
        )
    durations = []
    inputs = []
    after = []
    overhead = costs.action_overhead
    sends = costs.prices_sends
    for rank, row in enumerate(schedule.actions):
        for action in row:
            durations.append(costs.time_of(action))
            boundary = sent_boundary(action, placement) if sends else -1
            after.append(overhead + costs.send_time(boundary) if boundary >= 0 else overhead)
            delayed = []
            for producer in data_inputs(action, schedule, backward):
                if producer not in id_of:
                    raise ScheduleError(
                        f"{schedule.name or 'schedule'}: {action} needs {producer}, which no rank runs; "
                        "run pipefold.schedule.validate(schedule) for the full diagnosis"
                    )
                # The boundary crossed is the lower of the two stages (F: s-1 -> s; B: s+1 -> s).
                boundary = min(producer.stage, action.stage)
                delay = costs.transfer_time(boundary, placement[producer.stage], rank)
                delayed.append((id_of[producer], delay))
            inputs.append(tuple(delayed))
    _add_gathers(schedule, costs, id_of, inputs)
    return _Prepared(schedule.actions, tuple(first_id), tuple(durations), tuple(inputs), tuple(after))


def _add_gathers(
    schedule: Schedule,
    costs: CostModel,
    id_of: dict[Action, int],
    inputs: list[tuple[tuple[int, float], ...]],
) -> None:
    """Under full sharding, a stage's first compute action after an UNSHARD waits for the
    gather it started: an input from the UNSHARD, `costs.gather[stage]` seconds later. So a
    gather issued early (a look-ahead) overlaps the compute between, one issued right before
    its consumer is exposed. Gathers in flight at once do not slow each other here."""
    for row in schedule.actions:
        for index, unshard_index in gather_waits(row).items():
            action, consumer = row[index], id_of[row[index]]
            inputs[consumer] = inputs[consumer] + ((id_of[row[unshard_index]], costs.gather[action.stage]),)


def _run(
    prepared: _Prepared,
    schedule: Schedule,
    first_step: int,
    num_steps: int,
    free: list[float],
    not_before: float,
    events: list[list[Event]],
    waits: list[list[Wait]],
) -> None:
    """Run steps first_step .. first_step+num_steps-1 back to back without a barrier."""
    num_ranks = schedule.num_ranks
    num_actions = len(prepared.durations)
    durations = prepared.durations
    all_inputs = prepared.inputs
    after = prepared.after
    # ends[local_step * num_actions + id]: end time, or -1.0 while not yet run (times are >= 0).
    ends = [-1.0] * (num_actions * num_steps)
    positions = [0] * num_ranks
    totals = [len(row) * num_steps for row in prepared.actions]
    blocked_on: dict[int, list[int]] = defaultdict(list)
    queue = deque(range(num_ranks))
    while queue:
        rank = queue.popleft()
        row = prepared.actions[rank]
        row_length = len(row)
        first_id = prepared.first_id[rank]
        position = positions[rank]
        rank_free = free[rank]
        while position < totals[rank]:
            local_step, index = divmod(position, row_length)
            action_id = first_id + index
            offset = local_step * num_actions
            ready = rank_free + after[action_id - 1] if index else rank_free
            start = ready if ready > not_before else not_before
            missing = -1
            for producer, delay in all_inputs[action_id]:
                produced = ends[offset + producer]
                if produced < 0:
                    missing = producer
                    break
                if produced + delay > start:
                    start = produced + delay
            if missing >= 0:
                blocked_on[offset + missing].append(rank)
                break
            action = row[index]
            step = first_step + local_step
            if start > ready:
                waits[rank].append(Wait(rank, action, ready, start, step))
            end = start + durations[action_id]
            events[rank].append(Event(rank, action, start, end, step))
            ends[offset + action_id] = end
            rank_free = end
            position += 1
            woken = blocked_on.pop(offset + action_id, None)
            if woken:
                queue.extend(woken)
        positions[rank] = position
        free[rank] = rank_free

    _raise_if_stuck(prepared, schedule, positions, totals)


def _raise_if_stuck(prepared: _Prepared, schedule: Schedule, positions: list[int], totals: list[int]) -> None:
    stuck = [rank for rank in range(schedule.num_ranks) if positions[rank] < totals[rank]]
    if stuck:
        rank = stuck[0]
        index = positions[rank] % len(prepared.actions[rank])
        raise ScheduleError(
            f"{schedule.name or 'schedule'}: simulation deadlocked at rank {rank}, "
            f"{prepared.actions[rank][index]} (stuck ranks: {stuck}); run "
            f"pipefold.schedule.validate(schedule) for the full diagnosis\n"
            f"{format_grid(schedule.actions, mark=(rank, index))}"
        )


_WAIT_FLOOR = 1e-12
"""Seconds of wait below which a rank's wait is not recorded (float round-off)."""

_DONE_SHARE = 1e-12
"""The share of an action's own work below which what is left of it is round-off: relative, so an
action of 1e-13 s (a costs file may hold one) still takes its time."""


def _run_shared(
    prepared: _Prepared,
    schedule: Schedule,
    first_step: int,
    num_steps: int,
    free: list[float],
    not_before: float,
    events: list[list[Event]],
    waits: list[list[Wait]],
    num_cores: float,
) -> None:
    """`_run` for ranks that share `num_cores` cores (docs/decisions.md, "Shared cores").

    An action's duration now depends on what else runs beside it, so the worklist of
    `_run` does not apply: time advances from one start or end to the next, and in
    between every computing rank progresses at min(1, num_cores / computing) of full
    speed. O(events x ranks).
    """
    num_ranks = schedule.num_ranks
    num_actions = len(prepared.durations)
    durations = prepared.durations
    after = prepared.after
    ends = [-1.0] * (num_actions * num_steps)
    positions = [0] * num_ranks
    totals = [len(row) * num_steps for row in prepared.actions]
    # rank -> [remaining work (s), start, key into `ends`, whole work (s)]
    running: dict[int, list[float]] = {}
    now = not_before
    while True:
        earliest = math.inf
        began = False
        for rank in range(num_ranks):
            position = positions[rank]
            if rank in running or position >= totals[rank]:
                continue
            local_step, index = divmod(position, len(prepared.actions[rank]))
            action_id = prepared.first_id[rank] + index
            offset = local_step * num_actions
            ready = free[rank] + after[action_id - 1] if index else free[rank]
            start = max(ready, not_before)
            for producer, delay in prepared.inputs[action_id]:
                produced = ends[offset + producer]
                if produced < 0:
                    start = math.inf  # an input is not produced yet
                    break
                start = max(start, produced + delay)
            if start > now:
                earliest = min(earliest, start)
                continue
            # Times only move forward to the next start or end, so `start` is `now` here
            # but for round-off.
            if now > ready + _WAIT_FLOOR:
                action = prepared.actions[rank][index]
                waits[rank].append(Wait(rank, action, ready, now, first_step + local_step))
            running[rank] = [durations[action_id], now, float(offset + action_id), durations[action_id]]
            began = True
        if began:
            continue  # zero-length actions may have begun: settle them before time moves
        if not running:
            if earliest == math.inf:
                break  # done, or deadlocked (reported below)
            now = earliest  # idle until the next start
            continue
        rate = min(1.0, num_cores / len(running))
        until = min(min(entry[0] for entry in running.values()) / rate + now, earliest)
        progress = (until - now) * rate
        now = until
        for rank in list(running):
            entry = running[rank]
            entry[0] -= progress
            # Done when what is left is round-off, or too little to move the clock at all
            # (late in a long step, now + 1e-12 == now): waiting for it would never end.
            if entry[0] > _DONE_SHARE * entry[3] and now + entry[0] / rate > now:
                continue
            del running[rank]
            key = int(entry[2])
            local_step, index = divmod(positions[rank], len(prepared.actions[rank]))
            action = prepared.actions[rank][index]
            events[rank].append(Event(rank, action, entry[1], now, first_step + local_step))
            ends[key] = now
            free[rank] = now
            positions[rank] += 1
    _raise_if_stuck(prepared, schedule, positions, totals)


def simulate(
    schedule: Schedule, costs: CostModel, *, num_steps: int = 1, sync: bool = True
) -> Timeline:
    """Predict the timeline of `num_steps` calls of `schedule` (see docs/decisions.md, "Simulated semantics").

    Raises ConfigError for a bad `num_steps`, CostModelError if `costs` does not fit
    the schedule, ScheduleError if the schedule deadlocks or lacks an action another
    one consumes (a schedule from `build` never does).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps = {num_steps!r}; give an integer >= 1 (1 simulates one call)")
    costs.check_schedule(schedule)
    prepared = _prepare(schedule, costs)
    num_ranks = schedule.num_ranks
    events: list[list[Event]] = [[] for _ in range(num_ranks)]
    waits: list[list[Wait]] = [[] for _ in range(num_ranks)]
    free = [0.0] * num_ranks
    run = _run
    if costs.num_cores is not None and costs.shares_cores(num_ranks):
        run = functools.partial(_run_shared, num_cores=costs.num_cores)
    if sync:
        barrier = 0.0
        between = costs.step_overhead + step_end_time(schedule, costs)
        for step in range(num_steps):
            run(prepared, schedule, step, 1, free, barrier, events, waits)
            barrier = max(free) + between
    else:
        run(prepared, schedule, 0, num_steps, free, 0.0, events, waits)

    timeline = Timeline(
        num_ranks=num_ranks,
        events=tuple(tuple(row) for row in events),
        waits=tuple(tuple(row) for row in waits),
        source="simulated",
        schedule_name=schedule.name,
        meta={
            "num_steps": num_steps,
            "sync": sync,
            "num_stages": schedule.num_stages,
            "num_microbatches": schedule.num_microbatches,
            "placement": list(schedule.placement),
            "weight_update": str(schedule.weight_update),
        },
    )
    versions, weight_bytes = weight_versions(timeline, costs, schedule.weight_update, schedule.placement)
    return replace(
        timeline,
        activation_bytes_peak=activation_bytes_peak(timeline, costs),
        weight_versions_peak=versions,
        weight_bytes_peak=weight_bytes,
    )


def step_end_time(schedule: Schedule, costs: CostModel) -> float:
    """Seconds after a flush step's last action that the step's collectives take: the sum of each
    tied weight's gradient over the ranks that hold it (`CostModel.tied_exchange_time`; an
    asynchronous schedule sums at each STEP instead, not priced). The whole weight's gradient: a
    cost model does not know the replicas that full sharding divides it over (the planner does)."""
    if schedule.weight_update is not WeightUpdate.FLUSH:
        return 0.0
    return costs.tied_exchange_time(schedule.placement)


def predicted_step_time(schedule: Schedule, costs: CostModel) -> float:
    """Wall time of one synchronous step: the simulated makespan plus `costs.step_overhead`
    (the time outside the actions, which a timeline's events do not cover) and `step_end_time`."""
    return simulate(schedule, costs).makespan + costs.step_overhead + step_end_time(schedule, costs)
