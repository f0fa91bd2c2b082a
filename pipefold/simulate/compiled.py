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

from pipefold.errors import ScheduleError
from pipefold.schedule.deps import backward_of, data_inputs
from pipefold.schedule.ir import Action, Op, Schedule
from pipefold.simulate.costs import CostModel

__all__ = ["CompiledSchedule", "CompiledRun"]

_F, _B, _I, _W, _STEP = range(5)
_KIND = {Op.F: _F, Op.B: _B, Op.I: _I, Op.W: _W, Op.STEP: _STEP}

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
        backward = backward_of(schedule)
        placement = schedule.placement
        id_of: dict[Action, int] = {}
        rank_of: list[int] = []
        for rank, row in enumerate(schedule.actions):
            for action in row:
                id_of.setdefault(action, len(id_of))
                rank_of.append(rank)
        if len(id_of) != len(rank_of):
            raise ScheduleError(
                f"{schedule.name or 'schedule'}: an action appears twice; run "
                "pipefold.schedule.validate(schedule) to find it"
            )
        self.schedule = schedule
        self.num_ranks = schedule.num_ranks
        kinds: list[int] = []
        stages: list[int] = []
        previous: list[int] = []
        links: dict[tuple[int, int, int], int] = {}
        inputs: list[tuple[tuple[int, int], ...]] = []
        consumers: list[list[int]] = [[] for _ in range(len(id_of))]
        for rank, row in enumerate(schedule.actions):
            for index, action in enumerate(row):
                action_id = len(kinds)
                kinds.append(_KIND[action.op])
                stages.append(action.stage)
                previous.append(action_id - 1 if index else -1)
                found = []
                for producer in data_inputs(action, schedule, backward):
                    producer_id = id_of.get(producer)
                    if producer_id is None:
                        raise ScheduleError(
                            f"{schedule.name or 'schedule'}: {action} needs {producer}, which no rank runs; "
                            "run pipefold.schedule.validate(schedule) for the full diagnosis"
                        )
                    # The boundary crossed is the lower of the two stages (F: s-1 -> s; B: s+1 -> s).
                    key = (min(producer.stage, action.stage), placement[producer.stage], rank)
                    found.append((producer_id, links.setdefault(key, len(links))))
                    consumers[producer_id].append(action_id)
                inputs.append(tuple(found))
        self._kinds = kinds
        self._stages = stages
        self._previous = previous
        self._inputs = inputs
        self._links = list(links)
        self._order = self._topological(consumers, schedule)
        self._rows = [(sum(len(r) for r in schedule.actions[:rank]), len(row))
                      for rank, row in enumerate(schedule.actions)]

    def _topological(self, consumers: list[list[int]], schedule: Schedule) -> list[int]:
        waiting = [len(found) + (prev >= 0) for found, prev in zip(self._inputs, self._previous, strict=True)]
        num_actions = len(waiting)
        ready = deque(action_id for action_id in range(num_actions) if waiting[action_id] == 0)
        order = []
        while ready:
            action_id = ready.popleft()
            order.append(action_id)
            following = consumers[action_id]
            if action_id + 1 < num_actions and self._previous[action_id + 1] == action_id:
                following = [*following, action_id + 1]
            for other in following:
                waiting[other] -= 1
                if waiting[other] == 0:
                    ready.append(other)
        if len(order) != num_actions:
            stuck = next(i for i in range(num_actions) if waiting[i] > 0 and (
                self._previous[i] < 0 or waiting[self._previous[i]] == 0))
            raise ScheduleError(
                f"{schedule.name or 'schedule'}: simulation deadlocked at rank "
                f"{self._rank_of(stuck)}; run pipefold.schedule.validate(schedule) for the full diagnosis"
            )
        return order

    def _rank_of(self, action_id: int) -> int:
        for rank, (first, length) in enumerate(self._rows):
            if first <= action_id < first + length:
                return rank
        raise IndexError(action_id)

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
        inputs = self._inputs
        previous = self._previous
        overhead = costs.action_overhead
        ends = [0.0] * len(durations)
        first_start = float("inf")
        for action_id in self._order:
            prev = previous[action_id]
            start = ends[prev] + overhead if prev >= 0 else 0.0
            for producer, link in inputs[action_id]:
                arrival = ends[producer] + delays[link]
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
