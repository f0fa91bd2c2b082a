"""`CompiledSchedule`: one schedule flattened once, then timed under many cost models quickly.

The planner prices one family order under many partitions and recompute choices, at sizes
(64 ranks x 512 micro-batches) where building a `Timeline` of Python objects per simulation
costs seconds. A compiled schedule keeps the dependency graph as flat lists in a
topological order, so each run is one pass of float arithmetic:

    compiled = CompiledSchedule(schedule)
    run = compiled.run(costs)           # makespan, busy seconds, activation peaks
    compiled.order_activation_peaks(costs)  # before timing: from each rank's order

`run(costs)` gives the same makespan and activation peaks as `simulate(schedule, costs)`
(same float operations; tests/simulate/test_compiled.py checks it on random costs), for one
step of a flush or asynchronous schedule on ranks that do not share cores (see
`CompiledSchedule.supports`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NoReturn

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Op, Schedule
from pipefold.simulate.costs import CostModel

__all__ = ["CompiledSchedule", "CompiledRun"]

_F, _B, _I, _W, _STEP = range(5)
_KIND = {Op.F: _F, Op.B: _B, Op.I: _I, Op.W: _W, Op.STEP: _STEP}

_NAMES = ("F", "B", "I", "W", "STEP")

_ABSORBED = 1e-15
"""A duration below this share of the longest possible step could vanish in `start + duration`
(float round-off), so the order alone no longer tells which of two actions ends first."""


@dataclass(frozen=True)
class CompiledRun:
    """One timing of a compiled schedule under a cost model."""

    makespan: float
    """As `Timeline.makespan`: from the first start to the last end."""
    busy: float
    """Seconds computed, over all ranks."""
    activation_peaks: tuple[int, ...]
    """Per rank, as `pipefold.simulate.memory.activation_bytes_peak` of the simulated timeline."""

    def bubble_fraction(self, num_ranks: int) -> float:
        """As `Timeline.bubble_fraction` (up to round-off in the busy sum)."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - self.busy / (num_ranks * self.makespan)


class CompiledSchedule:
    """A schedule's actions and data dependencies as flat lists, in an order that runs them."""

    def __init__(self, schedule: Schedule) -> None:
        placement = schedule.placement
        num_stages = schedule.num_stages
        # Actions are keyed by integers ((stage * M + microbatch) * 5 + kind): hashing `Action`s is
        # what made flattening a 64-rank x 512-micro-batch schedule take seconds.
        span = max((action.microbatch for row in schedule.actions for action in row), default=0) + 1
        kinds: list[int] = []
        stages: list[int] = []
        microbatches: list[int] = []
        id_of: dict[int, int] = {}
        backward: dict[int, int] = {}  # stage * span + microbatch -> id of its B or I
        rows = []
        count = 0
        for row in schedule.actions:
            rows.append((count, len(row)))
            for action in row:
                kind = _KIND.get(action.op)
                if kind is None:
                    raise ScheduleError(
                        f"{schedule.name or 'schedule'}: {action} is a sharding action; a compiled "
                        "schedule times compute schedules only: use pipefold.simulate.simulate"
                    )
                stage, microbatch = action.stage, action.microbatch
                slot = stage * span + microbatch
                id_of[slot * 5 + kind] = count
                if kind == _B or kind == _I:
                    backward[slot] = count
                kinds.append(kind)
                stages.append(stage)
                microbatches.append(microbatch)
                count += 1
        if len(id_of) != count:
            raise ScheduleError(
                f"{schedule.name or 'schedule'}: an action appears twice; run "
                "pipefold.schedule.validate(schedule) to find it"
            )
        num_actions = len(kinds)
        previous = [-1] * num_actions
        owner = [0] * num_actions
        for rank, (first, length) in enumerate(rows):
            for action_id in range(first + 1, first + length):
                previous[action_id] = action_id - 1
            owner[first:first + length] = [rank] * length
        # The data inputs of docs/decisions.md, "Derived dependencies" (as `data_inputs`), at most two.
        first_input = [-1] * num_actions
        second_input = [-1] * num_actions
        first_link = [0] * num_actions
        second_link = [0] * num_actions
        links: dict[tuple[int, int, int], int] = {}
        for action_id in range(num_actions):
            kind, stage, microbatch = kinds[action_id], stages[action_id], microbatches[action_id]
            rank = owner[action_id]
            if kind == _F:
                if stage == 0:
                    continue
                producer = id_of.get(((stage - 1) * span + microbatch) * 5 + _F)
                if producer is None:
                    _missing(schedule, kind, stage, microbatch, f"F{stage - 1}.{microbatch}")
                crossing = (stage - 1, placement[stage - 1], rank)
                first_input[action_id] = producer
                first_link[action_id] = links.setdefault(crossing, len(links))
            elif kind == _B or kind == _I:
                producer = id_of.get((stage * span + microbatch) * 5 + _F)
                if producer is None:
                    _missing(schedule, kind, stage, microbatch, f"F{stage}.{microbatch}")
                first_input[action_id] = producer  # same rank: no link crossed
                first_link[action_id] = links.setdefault((stage, rank, rank), len(links))
                if stage < num_stages - 1:
                    producer = backward.get((stage + 1) * span + microbatch)
                    if producer is None:
                        _missing(schedule, kind, stage, microbatch, f"B{stage + 1}.{microbatch}")
                    # The boundary crossed is the lower of the two stages (B: s+1 -> s).
                    crossing = (stage, placement[stage + 1], rank)
                    second_input[action_id] = producer
                    second_link[action_id] = links.setdefault(crossing, len(links))
            elif kind == _W:
                producer = id_of.get((stage * span + microbatch) * 5 + _I)
                if producer is None:
                    _missing(schedule, kind, stage, microbatch, f"I{stage}.{microbatch}")
                first_input[action_id] = producer
                first_link[action_id] = links.setdefault((stage, rank, rank), len(links))
        self.schedule = schedule
        self.num_ranks = schedule.num_ranks
        self._kinds = kinds
        self._stages = stages
        self._previous = previous
        self._first_input, self._first_link = first_input, first_link
        self._second_input, self._second_link = second_input, second_link
        self._links = list(links)
        self._rows = rows
        self._order = self._topological(schedule)

    def _topological(self, schedule: Schedule) -> list[int]:
        # The simulator's own worklist: each rank runs on until an input is missing, and is woken
        # when that input's producer runs.
        first_input, second_input = self._first_input, self._second_input
        done = bytearray(len(self._kinds))
        positions = [first for first, _ in self._rows]
        blocked: dict[int, list[int]] = {}
        queue = deque(range(len(self._rows)))
        order: list[int] = []
        while queue:
            rank = queue.popleft()
            first, length = self._rows[rank]
            position, stop = positions[rank], first + length
            while position < stop:
                missing = first_input[position]
                if missing < 0 or done[missing]:
                    missing = second_input[position]
                    if missing >= 0 and done[missing]:
                        missing = -1
                if missing >= 0:
                    blocked.setdefault(missing, []).append(rank)
                    break
                done[position] = 1
                order.append(position)
                woken = blocked.pop(position, None)
                if woken:
                    queue.extend(woken)
                position += 1
            positions[rank] = position
        if len(order) != len(done):
            rank = next(r for r, (first, length) in enumerate(self._rows) if positions[r] < first + length)
            action_id = positions[rank]
            raise ScheduleError(
                f"{schedule.name or 'schedule'}: simulation deadlocked at rank {rank}, "
                f"{_name(self._kinds[action_id], self._stages[action_id], -1)}; run "
                "pipefold.schedule.validate(schedule) for the full diagnosis"
            )
        return order

    @staticmethod
    def supports(costs: CostModel, schedule: Schedule) -> bool:
        """Whether `run` times `schedule` as `simulate` would: ranks do not share cores (processor
        sharing makes a duration depend on what runs beside it)."""
        return not costs.shares_cores(schedule.num_ranks)

    def _durations(self, costs: CostModel) -> list[float]:
        tables = (costs.f, costs.b, costs.i, costs.w, costs.step)
        return [tables[kind][stage] for kind, stage in zip(self._kinds, self._stages, strict=True)]

    def run(self, costs: CostModel) -> CompiledRun:
        """Time one step (as `simulate(schedule, costs)` with the default `num_steps=1`)."""
        costs.check_schedule(self.schedule)
        if not self.supports(costs, self.schedule):
            raise ValueError("ranks share cores: use pipefold.simulate.simulate")
        durations = self._durations(costs)
        delays = [costs.transfer_time(*key) for key in self._links]
        previous = self._previous
        first_input, first_link = self._first_input, self._first_link
        second_input, second_link = self._second_input, self._second_link
        overhead = costs.action_overhead
        ends = [0.0] * len(durations)
        first_start = float("inf")
        for action_id in self._order:
            prev = previous[action_id]
            start = ends[prev] + overhead if prev >= 0 else 0.0
            producer = first_input[action_id]
            if producer >= 0:
                arrival = ends[producer] + delays[first_link[action_id]]
                if arrival > start:
                    start = arrival
                producer = second_input[action_id]
                if producer >= 0:
                    arrival = ends[producer] + delays[second_link[action_id]]
                    if arrival > start:
                        start = arrival
            if prev < 0 and start < first_start:
                first_start = start
            ends[action_id] = start + durations[action_id]
        if not ends:
            return CompiledRun(0.0, 0.0, (0,) * self.num_ranks)
        # Each rank's actions run one after another, so its first action starts first.
        makespan = max(ends) - first_start
        return CompiledRun(makespan, sum(durations), self._peaks(costs, ends))

    def _peaks(self, costs: CostModel, ends: list[float] | None) -> tuple[int, ...]:
        # Changes at equal end times are released first (as activation_bytes_peak sorts them); a
        # rank's ends never decrease, so the held bytes only need checking where the end time moves.
        activation = costs.activation_bytes
        held_for_w = costs.weight_grad_bytes
        kinds, stages = self._kinds, self._stages
        peaks = []
        for first, length in self._rows:
            held = peak = 0
            for action_id in range(first, first + length):
                kind = kinds[action_id]
                stage = stages[action_id]
                if kind == _F:
                    held += activation[stage]
                elif kind == _B:
                    held -= activation[stage]
                elif kind == _I:
                    held += held_for_w[stage] - activation[stage]
                elif kind == _W:
                    held -= held_for_w[stage]
                if ends is None or action_id + 1 == first + length or ends[action_id + 1] != ends[action_id]:
                    if held > peak:
                        peak = held
            peaks.append(peak)
        return tuple(peaks)

    def order_activation_peaks(self, costs: CostModel) -> tuple[int, ...] | None:
        """Per rank, the activation peak `run(costs)` will report, from each rank's order alone (no
        timing); None where the order alone cannot tell it (a duration so small that two actions of a
        rank may end at the same time, where the timed peak releases first)."""
        costs.check_schedule(self.schedule)
        durations = self._durations(costs)
        longest = sum(durations) + len(durations) * costs.action_overhead + sum(
            costs.transfer_time(*key) for key in self._links) * len(durations)
        compute = [d for d, kind in zip(durations, self._kinds, strict=True) if kind != _STEP]
        if compute and min(compute) <= longest * _ABSORBED:
            return None
        return self._peaks(costs, None)


def _name(kind: int, stage: int, microbatch: int) -> str:
    return f"{_NAMES[kind]}{stage}" + (f".{microbatch}" if microbatch >= 0 else "")


def _missing(schedule: Schedule, kind: int, stage: int, microbatch: int, needed: str) -> NoReturn:
    raise ScheduleError(
        f"{schedule.name or 'schedule'}: {_name(kind, stage, microbatch)} needs {needed}, which no rank "
        "runs; run pipefold.schedule.validate(schedule) for the full diagnosis"
    )
