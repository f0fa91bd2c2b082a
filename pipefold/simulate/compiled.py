"""`CompiledSchedule`: one schedule flattened once, then timed under many cost models quickly.

The planner prices one family order under many partitions and recompute choices, at sizes
(64 ranks x 512 micro-batches) where building a `Timeline` of Python objects per simulation
costs seconds. A compiled schedule keeps the dependency graph as flat arrays, in levels
where the order is wide (each rank's next action once its inputs are in earlier levels; a level is
timed with a few array operations) and else in a topological order timed one action at a time;
both give every action the same float operations:

    compiled = CompiledSchedule(schedule)
    run = compiled.run(costs)           # makespan, busy seconds, activation peaks
    compiled.order_activation_peaks(costs)  # before timing: from each rank's order

`run(costs)` gives the same makespan and activation peaks as `simulate(schedule, costs)`
(same float operations; tests/simulate/test_compiled.py checks it on random costs), for one
step of a flush or asynchronous schedule on ranks that do not share cores (see
`CompiledSchedule.supports`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import NoReturn

import numpy as np

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Op, Schedule
from pipefold.simulate.costs import CostModel

__all__ = ["CompiledSchedule", "CompiledRun", "KINDS", "Row", "rows_of"]

_F, _B, _I, _W, _STEP = range(5)
KINDS = (Op.F, Op.B, Op.I, Op.W, Op.STEP)
"""The op of each kind number in `CompiledSchedule`'s rows."""
_KIND = {op: kind for kind, op in enumerate(KINDS)}
_EMPTY = np.zeros(0, dtype=np.int64)

Row = tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]
"""One rank's actions: kinds (numbered as `KINDS`), stages, micro-batches."""

_NAMES = ("F", "B", "I", "W", "STEP")

_MIN_PER_LEVEL = 16
"""Fewer actions per level on average than this: timing level by level (a few array operations per
level) would cost more than one action at a time (few ranks, or a nearly sequential order as naive's)."""


_CHECK_EVERY = 256
"""How often (in levels) the wavefront checks that its levels are not far thinner than pays."""


@dataclass(frozen=True, eq=False)
class _Levels:
    """The actions level by level, one lane per rank (see `CompiledSchedule._wavefront`): per lane
    the action's id (idle lanes: a slot past the actions), its previous action on the rank, its
    inputs (a slot that never arrives where none), and the link each input crosses."""

    ids: np.ndarray
    inputs: np.ndarray
    """Per level, (previous, first input, second input) x lanes."""
    first_links: np.ndarray
    second_links: np.ndarray
    heads: np.ndarray
    """The ranks' first actions."""

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
    later_peaks: tuple[int, ...] = ()
    """Per rank, as `pipefold.simulate.memory.later_activation_bytes_peak`: the most held once the
    rank's first backward has ended (its gradients exist from then on); empty: not counted."""

    def bubble_fraction(self, num_ranks: int) -> float:
        """As `Timeline.bubble_fraction` (up to round-off in the busy sum)."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - self.busy / (num_ranks * self.makespan)


class CompiledSchedule:
    """A schedule's actions and data dependencies as flat lists, in an order that runs them."""

    def __init__(self, schedule: Schedule, rows: Sequence[Row] | None = None) -> None:
        """`rows`: the schedule's actions per rank as (kinds, stages, micro-batches) integer arrays
        (`KINDS` numbers the ops), where the caller has them without `Action` objects; `schedule`
        then needs only its header (its `actions` may be empty rows)."""
        if rows is None:
            rows = rows_of(schedule)
        placement = np.asarray(schedule.placement, dtype=np.int64)
        num_stages = schedule.num_stages
        lengths = [len(row[0]) for row in rows]
        kinds = np.concatenate([np.asarray(row[0], dtype=np.int64) for row in rows]) if rows else _EMPTY
        stages = np.concatenate([np.asarray(row[1], dtype=np.int64) for row in rows]) if rows else _EMPTY
        microbatches = (np.concatenate([np.asarray(row[2], dtype=np.int64) for row in rows]) if rows
                        else _EMPTY)
        num_actions = len(kinds)
        starts = np.cumsum([0, *lengths])[:-1].astype(np.int64)
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
        ids = np.arange(num_actions, dtype=np.int64)
        # Actions are keyed by integers ((stage * M + microbatch) * 5 + kind) in dense tables:
        # hashing `Action`s is what made flattening a 64-rank x 512-micro-batch schedule take seconds.
        span = int(microbatches.max()) + 1 if num_actions else 1
        num_slots = (int(stages.max()) + 2 if num_actions else 1) * span
        slot = stages * span + microbatches
        key = slot * 5 + kinds
        id_of = np.full(num_slots * 5, -1, dtype=np.int64)
        id_of[key] = ids
        if num_actions and not np.array_equal(id_of[key], ids):  # (a key given twice keeps its last id)
            raise ScheduleError(
                f"{schedule.name or 'schedule'}: an action appears twice; run "
                "pipefold.schedule.validate(schedule) to find it"
            )
        backward = np.full(num_slots, -1, dtype=np.int64)  # stage * span + microbatch -> id of its B or I
        is_backward = (kinds == _B) | (kinds == _I)
        backward[slot[is_backward]] = ids[is_backward]
        previous = ids - 1
        previous[starts[np.asarray(lengths) > 0]] = -1
        # The data inputs of docs/decisions.md, "Derived dependencies" (as `data_inputs`), at most two.
        is_f = (kinds == _F) & (stages > 0)
        is_w = kinds == _W
        first_key = np.where(is_f, slot - span, slot) * 5 + np.where(is_w, _I, _F)
        has_first = is_f | is_backward | is_w
        first_input = np.where(has_first, id_of[np.where(has_first, first_key, 0)], -1)
        has_second = is_backward & (stages < num_stages - 1)
        second_input = np.where(has_second, backward[np.where(has_second, slot + span, 0)], -1)
        missing = (has_first & (first_input < 0)) | (has_second & (second_input < 0))
        if missing.any():
            at = int(np.argmax(missing))
            kind, stage, microbatch = int(kinds[at]), int(stages[at]), int(microbatches[at])
            if has_first[at] and first_input[at] < 0:
                needed = {_F: f"F{stage - 1}", _W: f"I{stage}"}.get(kind, f"F{stage}")
            else:
                needed = f"B{stage + 1}"
            _missing(schedule, kind, stage, microbatch, f"{needed}.{microbatch}")
        # The link each input crosses, as (boundary stage, from rank, to rank), numbered in the order
        # the actions first use them: a forward's from the stage below, a backward's own forward on
        # its rank (no link crossed), its gradient from the stage above; a W's I on its rank.
        num_ranks = max(schedule.num_ranks, 1)
        boundary = np.where(is_f, stages - 1, stages)
        source = np.where(is_f, placement[np.maximum(stages - 1, 0)], owner)
        first_code = (boundary * num_ranks + source) * num_ranks + owner
        above = placement[np.minimum(stages + 1, max(num_stages - 1, 0))] if num_stages else owner
        second_code = (stages * num_ranks + above) * num_ranks + owner
        codes = np.stack([np.where(has_first, first_code, -1), np.where(has_second, second_code, -1)], axis=1)
        used = codes.reshape(-1)
        used = used[used >= 0]
        num_codes = int(used.max()) + 1 if len(used) else 0
        if num_codes <= 4 * len(used) + (1 << 20):
            # Each code's first use, from a table over all codes (np.unique sorts, ten times slower).
            first_use = np.full(num_codes, len(used), dtype=np.int64)
            np.minimum.at(first_use, used, np.arange(len(used), dtype=np.int64))
            distinct = np.flatnonzero(first_use < len(used))
            first_at = first_use[distinct]
            number_of = np.zeros(num_codes, dtype=np.int64)
            by_first_use = distinct[np.argsort(first_at, kind="stable")]
            number_of[by_first_use] = np.arange(len(distinct), dtype=np.int64)
            rank_of_code = number_of[distinct]
            numbers = number_of[used]
        else:
            distinct, first_at, inverse = np.unique(used, return_index=True, return_inverse=True)
            rank_of_code = np.empty(len(distinct), dtype=np.int64)
            rank_of_code[np.argsort(first_at, kind="stable")] = np.arange(len(distinct), dtype=np.int64)
            numbers = rank_of_code[inverse.reshape(-1)]
        flat = np.zeros(codes.size, dtype=np.int64)
        flat[codes.reshape(-1) >= 0] = numbers
        numbered = flat.reshape(-1, 2)
        by_number = distinct[np.argsort(rank_of_code)]
        self._owner = owner
        self._sent: np.ndarray | None = None  # `_sent_boundaries`, once a priced send asks
        self.schedule = schedule
        self.num_ranks = schedule.num_ranks
        self._kind_array, self._stage_array = kinds, stages
        self._has_step = bool((kinds == _STEP).any())

        self._num_actions = num_actions
        self._first_input, self._second_input = first_input, second_input
        self._links = [(int(code // (num_ranks * num_ranks)), int(code // num_ranks % num_ranks),
                        int(code % num_ranks)) for code in by_number]
        self._rows = [(int(first), length) for first, length in zip(starts, lengths, strict=True)]
        self._ids, self._previous, self._numbered = ids, previous, numbered
        self._levels = self._wavefront(schedule, starts, np.asarray(lengths, dtype=np.int64))
        self._order: list[int] = []
        self._steps: tuple[list[int], ...] = ()
        self._order_arrays: tuple[np.ndarray, ...] = ()
        if self._levels is None:
            self._set_order(self._by_microbatch(microbatches) or self._topological(schedule))

    def _set_order(self, order: list[int]) -> None:
        # Per action in the topological order: its id, previous action on its rank, and up to two data
        # inputs with the link each crosses (-1: none), as flat lists (`_run_in_order` zips them).
        self._order = order
        in_order = np.asarray(order, dtype=np.intp)
        self._steps = tuple(column[in_order].tolist()
                            for column in (self._ids, self._previous, self._first_input, self._second_input))
        self._order_arrays = (in_order, self._numbered[in_order, 0], self._numbered[in_order, 1])

    def _wavefront(self, schedule: Schedule, starts: np.ndarray, lengths: np.ndarray) -> _Levels | None:
        """The actions in levels: at each, every rank whose next action has its inputs from earlier
        levels runs it (one action per rank per level), so `run` times a level's actions with a few
        array operations. None where the levels are too thin to pay (a nearly sequential order, as
        naive's), and for an order that deadlocks (`_topological` says where)."""
        num_actions = self._num_actions
        num_rows = len(self._rows)
        limit = num_actions // _MIN_PER_LEVEL
        if not num_actions or num_rows < _MIN_PER_LEVEL:
            return None
        missing, no_previous, dump = num_actions, num_actions + 1, num_actions + 2
        # The walk runs over the actions with one slot more after each rank's row, a wall that is never
        # ready (its input is a slot never done), and two slots at the end: `missing` (an input of
        # none, always done) and `never`.
        first, second = self._first_input, self._second_input
        shift = np.repeat(np.arange(num_rows, dtype=np.int64), lengths)  # where action ids moved to
        size = num_actions + num_rows
        walk_missing, never = size, size + 1
        moved_to = np.arange(num_actions, dtype=np.int64) + shift

        def walked(inputs: np.ndarray) -> np.ndarray:
            table = np.full(size + 2, walk_missing, dtype=np.int64)
            table[moved_to] = np.where(inputs < 0, walk_missing, inputs + shift[np.maximum(inputs, 0)])
            table[starts + lengths + np.arange(num_rows)] = never
            return table

        first_of, second_of = walked(first), walked(second)
        done = np.zeros(size + 2, dtype=bool)
        done[walk_missing] = True
        position = starts + np.arange(num_rows, dtype=np.int64)
        # Per level the lanes' positions; a lane ran where its position moved on at the next level.
        positions = np.empty((limit + 1, num_rows), dtype=np.int64)
        num_levels = 0
        origin = int(position.sum())
        while True:
            ready = done[first_of[position]] & done[second_of[position]]
            if not np.count_nonzero(ready):
                break
            if num_levels == limit:
                return None
            if num_levels % _CHECK_EVERY == 0 and (
                    int(position.sum()) - origin < num_levels * _MIN_PER_LEVEL // 4):
                return None  # thin from the start (as naive's): given up early
            done[position] = ready
            positions[num_levels] = position
            num_levels += 1
            position = position + ready
        if not np.array_equal(position, starts + lengths + np.arange(num_rows, dtype=np.int64)):
            return None  # a deadlock: `_topological` says where
        positions[num_levels] = position
        lanes = positions[1:num_levels + 1] != positions[:num_levels]
        table = np.where(lanes, positions[:num_levels] - np.arange(num_rows, dtype=np.int64), dump)
        safe = np.where(lanes, table, 0)
        previous = np.where(lanes & (self._previous[safe] >= 0), self._previous[safe], no_previous)
        firsts = np.where(lanes & (first[safe] >= 0), first[safe], missing)
        seconds = np.where(lanes & (second[safe] >= 0), second[safe], missing)
        num_links = len(self._links)
        first_links = np.where(firsts != missing, self._numbered[safe, 0], num_links)
        second_links = np.where(seconds != missing, self._numbered[safe, 1], num_links)
        heads = starts[lengths > 0]
        return _Levels(table, np.stack([previous, firsts, seconds], axis=1), first_links, second_links, heads)

    def _by_microbatch(self, microbatches: np.ndarray) -> list[int] | None:
        """A topological order in one sort, where it is one: micro-batch after micro-batch, each one's
        forwards up the stages and then its backwards (B or I) down, the order of a sequential
        schedule as naive's (whose thin levels leave it to a topological order, which a walk finds
        at ten times the cost). None where that order breaks a dependency, or there are W's or STEPs."""
        kinds, stages = self._kind_array, self._stage_array
        num_actions = self._num_actions
        if not num_actions or bool(((kinds == _W) | (kinds == _STEP)).any()):
            return None
        num_stages = int(stages.max()) + 1
        phase = np.where(kinds == _F, stages, 2 * num_stages - 1 - stages)
        order = np.argsort(microbatches * (2 * num_stages) + phase, kind="stable")
        position = np.empty(num_actions, dtype=np.int64)
        position[order] = np.arange(num_actions, dtype=np.int64)
        for inputs in (self._previous, self._first_input, self._second_input):
            given = inputs >= 0
            if not bool((position[inputs[given]] < position[given]).all()):
                return None
        result: list[int] = order.tolist()
        return result

    def _topological(self, schedule: Schedule) -> list[int]:
        # Passes over the ranks, each running on until an input is missing, up the ranks then down
        # (forwards flow up, gradients down), until none moves: cheaper per action than a worklist
        # that parks and wakes ranks, and where it stops (a deadlock) is the same.
        first_input, second_input = self._first_input.tolist(), self._second_input.tolist()
        num_actions = self._num_actions
        # One entry more, always set: an input of -1 (none) reads it as done.
        done = bytearray(num_actions + 1)
        done[num_actions] = 1
        positions = [first for first, _ in self._rows]
        stops = [first + length for first, length in self._rows]
        active = [rank for rank in range(len(self._rows)) if positions[rank] < stops[rank]]
        order: list[int] = []
        while active:
            moved = False
            waiting = []
            for rank in active:
                begin = position = positions[rank]
                stop = stops[rank]
                while position < stop and done[first_input[position]] and done[second_input[position]]:
                    done[position] = 1
                    position += 1
                if position != begin:
                    order.extend(range(begin, position))
                    positions[rank] = position
                    moved = True
                if position < stop:
                    waiting.append(rank)
            if not moved:
                break
            waiting.reverse()
            active = waiting
        if len(order) != num_actions:
            rank = next(r for r, (first, length) in enumerate(self._rows) if positions[r] < first + length)
            action_id = positions[rank]
            raise ScheduleError(
                f"{schedule.name or 'schedule'}: simulation deadlocked at rank {rank}, "
                f"{_name(int(self._kind_array[action_id]), int(self._stage_array[action_id]), -1)}; run "
                "pipefold.schedule.validate(schedule) for the full diagnosis"
            )
        return order

    @staticmethod
    def supports(costs: CostModel, schedule: Schedule) -> bool:
        """Whether `run` times `schedule` as `simulate` would: ranks do not share cores (processor
        sharing makes a duration depend on what runs beside it)."""
        return not costs.shares_cores(schedule.num_ranks)

    def _durations(self, costs: CostModel) -> np.ndarray:
        tables = (costs.f, costs.b, costs.i, costs.w, costs.step)
        if not costs.step and not self._has_step:
            tables = (*tables[:4], (0.0,) * len(costs.f))  # (no STEP reads it)
        if len({len(table) for table in tables}) == 1:
            # One gather over a (kind, stage) table: the same floats, without a Python loop.
            durations: np.ndarray = np.array(tables, dtype=np.float64)[self._kind_array, self._stage_array]
            return durations
        kinds, stages = self._kind_array.tolist(), self._stage_array.tolist()
        by_action = [tables[kind][stage] for kind, stage in zip(kinds, stages, strict=True)]
        return np.array(by_action, dtype=np.float64)

    def run(self, costs: CostModel) -> CompiledRun:
        """Time one step (as `simulate(schedule, costs)` with the default `num_steps=1`)."""
        costs.check_schedule(self.schedule)
        if not self.supports(costs, self.schedule):
            raise ValueError("ranks share cores: use pipefold.simulate.simulate")
        lengths = self._durations(costs)
        durations = lengths.tolist()
        if not durations:
            return CompiledRun(0.0, 0.0, (0,) * self.num_ranks, (0,) * self.num_ranks)
        delays = [costs.transfer_time(*key) for key in self._links]
        after = self._after(costs)
        if self._levels is None:
            ends_list, first_start = self._run_in_order(costs, lengths, delays, after)
            latest = max(ends_list)
            ends: list[float] | np.ndarray = ends_list
        else:
            ends_array, first_start = self._run_levels(costs, lengths, delays, self._levels, after)
            latest = float(ends_array.max())
            ends = ends_array
        # Each rank's actions run one after another, so its first action starts first.
        peaks, later = self._peaks(costs, ends)
        return CompiledRun(latest - first_start, sum(durations), peaks, later)

    def _after(self, costs: CostModel) -> np.ndarray | None:
        """Per action, the seconds its rank spends after it before its next action: the overhead, and
        the send of its output to another rank (`CostModel.send_time`); None where no send is priced
        (the overhead alone, one number)."""
        if not costs.prices_sends:
            return None
        if self._sent is None:
            self._sent = self._sent_boundaries()
        sends = np.array([costs.send_time(boundary) for boundary in range(costs.num_stages - 1)] + [0.0],
                         dtype=np.float64)
        after: np.ndarray = costs.action_overhead + sends[self._sent]  # -1 (none): the 0.0 at the end
        return after

    def _sent_boundaries(self) -> np.ndarray:
        """Per action, the boundary its output crosses to another rank (`sent_boundary`), -1 where none."""
        kinds, stages, owner = self._kind_array, self._stage_array, self._owner
        placement = np.asarray(self.schedule.placement, dtype=np.int64)
        num_stages = len(placement)
        if not num_stages:
            return np.full(len(kinds), -1, dtype=np.int64)
        above = placement[np.minimum(stages + 1, num_stages - 1)]
        below = placement[np.maximum(stages - 1, 0)]
        forward = (kinds == _F) & (stages < num_stages - 1) & (above != owner)
        backward = ((kinds == _B) | (kinds == _I)) & (stages > 0) & (below != owner)
        sent: np.ndarray = np.where(forward, stages, np.where(backward, stages - 1, -1))
        return sent

    def _run_levels(self, costs: CostModel, durations: np.ndarray, delays: list[float], levels: _Levels,
                    after: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """Each action's end, level by level: per action the same float operations as
        `_run_in_order` (a start is the largest of the previous end plus the overhead, and the
        previous action's send where `after` prices one, and each input's arrival, an end its start
        plus the duration), so the same floats."""
        num_actions = len(durations)
        overhead = costs.action_overhead
        # The slots past the actions: a missing input arrives never; a rank's first action starts
        # at 0.0 (-overhead + overhead is exactly 0.0); idle lanes write to the last.
        ends = np.empty(num_actions + 3, dtype=np.float64)
        ends[num_actions] = -np.inf
        ends[num_actions + 1] = -overhead
        lengths = np.append(durations, (0.0, 0.0, 0.0))[levels.ids]
        link_delays = np.append(np.asarray(delays, dtype=np.float64), 0.0)
        # Per level and lane what is added to each of the three ends read: the overhead to the previous
        # action's, each input's link delay to its.
        offsets = np.empty(levels.inputs.shape, dtype=np.float64)
        if after is None:
            offsets[:, 0] = overhead
        else:  # the previous action's own (a rank's first: the overhead, as above)
            offsets[:, 0] = np.append(after, (0.0, overhead, 0.0))[levels.inputs[:, 0]]
        offsets[:, 1] = link_delays[levels.first_links]
        offsets[:, 2] = link_delays[levels.second_links]
        for ids, inputs, offset, length in zip(levels.ids, levels.inputs, offsets, lengths, strict=True):
            arrivals = ends[inputs]
            arrivals += offset
            start = np.maximum(arrivals[0], arrivals[1])
            np.maximum(start, arrivals[2], out=start)
            start += length
            ends[ids] = start
        # The first actions' starts, recomputed as above (0.0 or a later input).
        heads = levels.heads
        first_input, second_input = self._first_input[heads], self._second_input[heads]
        numbered = self._numbered[heads]
        starts = np.zeros(len(heads), dtype=np.float64)
        for inputs, links in ((first_input, numbered[:, 0]), (second_input, numbered[:, 1])):
            arrivals = np.where(inputs >= 0, ends[np.maximum(inputs, 0)] + link_delays[links], -np.inf)
            np.maximum(starts, arrivals, out=starts)
        return ends[:num_actions], float(starts.min())

    def _run_in_order(self, costs: CostModel, durations: np.ndarray, delays: list[float],
                      after: np.ndarray | None = None) -> tuple[list[float], float]:
        """Each action's end, one action at a time in the topological order, and the first start."""
        overhead = costs.action_overhead
        # Per action in order, the seconds after its previous action on the rank.
        gaps: Iterable[float] = repeat(overhead) if after is None else (
            np.append(after, overhead)[self._previous[self._order_arrays[0]]].tolist())
        ends = [0.0] * len(durations)
        first_start = float("inf")
        # Per action in order its duration and each input's link delay, gathered at once.
        order, first_links, second_links = self._order_arrays
        in_order = durations[order].tolist()
        link_delays = np.asarray(delays + [0.0], dtype=np.float64)
        first_delays = link_delays[first_links].tolist()
        second_delays = link_delays[second_links].tolist()
        for action_id, prev, first, second, first_delay, second_delay, duration, gap in zip(
                *self._steps, first_delays, second_delays, in_order, gaps, strict=False):
            start = ends[prev] + gap if prev >= 0 else 0.0
            if first >= 0:
                arrival = ends[first] + first_delay
                if arrival > start:
                    start = arrival
                if second >= 0:
                    arrival = ends[second] + second_delay
                    if arrival > start:
                        start = arrival
            if prev < 0 and start < first_start:
                first_start = start
            ends[action_id] = start + duration
        return ends, first_start

    def _peaks(self, costs: CostModel, ends: list[float] | np.ndarray | None
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per rank, the activation peak, and the most held once its first backward (B or I) has
        ended (`CompiledRun.later_peaks`; a rank without one: its peak)."""
        # Changes at equal end times are released first (as activation_bytes_peak sorts them); a
        # rank's ends never decrease, so the held bytes only need checking where the end time moves.
        activation = costs.activation_bytes
        held_for_w = costs.weight_grad_bytes
        largest = max(max(activation, default=0), max(held_for_w, default=0))
        if largest * (self._num_actions + 1) < 2**62:
            return self._array_peaks(activation, held_for_w, ends)
        kinds, stages = self._kind_array.tolist(), self._stage_array.tolist()
        peaks, later_peaks = [], []
        for first, length in self._rows:
            held = peak = 0
            later: int | None = None
            for action_id in range(first, first + length):
                kind = kinds[action_id]
                stage = stages[action_id]
                if later is None and (kind == _B or kind == _I):
                    later = 0
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
                    if later is not None and held > later:
                        later = held
            peaks.append(peak)
            later_peaks.append(peak if later is None else later)
        return tuple(peaks), tuple(later_peaks)

    def _array_peaks(self, activation: Sequence[int], held_for_w: Sequence[int],
                     ends: list[float] | np.ndarray | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """`_peaks` with numpy: the same integer sums, where they cannot overflow 64 bits."""
        kinds, stages = self._kind_array, self._stage_array
        act = np.asarray(activation, dtype=np.int64)[stages]
        held = np.asarray(held_for_w, dtype=np.int64)[stages]
        change = np.select([kinds == _F, kinds == _B, kinds == _I, kinds == _W],
                           [act, -act, held - act, -held], 0)
        times = None if ends is None else np.asarray(ends, dtype=np.float64)
        is_backward = (kinds == _B) | (kinds == _I)
        peaks, later_peaks = [], []
        for first, length in self._rows:
            if not length:
                peaks.append(0)
                later_peaks.append(0)
                continue
            totals = np.cumsum(change[first:first + length])
            # Checked where the rank's end time moves on (changes at one time are released first).
            checked = np.ones(length, dtype=bool)
            if times is not None:
                checked[:-1] = times[first + 1:first + length] != times[first:first + length - 1]
            peak = max(0, int(totals[checked].max()))
            peaks.append(peak)
            backwards = np.flatnonzero(is_backward[first:first + length])
            if not len(backwards):
                later_peaks.append(peak)
                continue
            # From the first backward's end on (its release counted): where its gradients exist.
            after = backwards[0]
            later_peaks.append(max(0, int(totals[after:][checked[after:]].max(initial=0))))
        return tuple(peaks), tuple(later_peaks)

    def order_activation_peaks(self, costs: CostModel) -> tuple[int, ...] | None:
        """Per rank, the activation peak `run(costs)` will report, from each rank's order alone (no
        timing); None where the order alone cannot tell it (a duration so small that two actions of a
        rank may end at the same time, where the timed peak releases first)."""
        both = self.order_peaks_and_later(costs)
        return None if both is None else both[0]

    def order_peaks_and_later(self, costs: CostModel) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """`order_activation_peaks` and `CompiledRun.later_peaks` from each rank's order alone."""
        costs.check_schedule(self.schedule)
        lengths = self._durations(costs)
        durations = lengths.tolist()
        sends = max((costs.send_time(boundary) for boundary in range(costs.num_stages - 1)), default=0.0)
        longest = sum(durations) + len(durations) * (costs.action_overhead + sends) + sum(
            costs.transfer_time(*key) for key in self._links) * len(durations)
        compute = lengths[self._kind_array != _STEP]
        if compute.size and float(compute.min()) <= longest * _ABSORBED:
            return None
        return self._peaks(costs, None)


def rows_of(schedule: Schedule) -> list[Row]:
    """`schedule`'s rows of (kinds, stages, micro-batches); refuses sharding actions."""
    rows: list[Row] = []
    for row in schedule.actions:
        kinds = []
        for action in row:
            kind = _KIND.get(action.op)
            if kind is None:
                raise ScheduleError(
                    f"{schedule.name or 'schedule'}: {action} is a sharding action; a compiled "
                    "schedule times compute schedules only: use pipefold.simulate.simulate"
                )
            kinds.append(kind)
        rows.append((kinds, [action.stage for action in row], [action.microbatch for action in row]))
    return rows


def _name(kind: int, stage: int, microbatch: int) -> str:
    return f"{_NAMES[kind]}{stage}" + (f".{microbatch}" if microbatch >= 0 else "")


def _missing(schedule: Schedule, kind: int, stage: int, microbatch: int, needed: str) -> NoReturn:
    raise ScheduleError(
        f"{schedule.name or 'schedule'}: {_name(kind, stage, microbatch)} needs {needed}, which no rank "
        "runs; run pipefold.schedule.validate(schedule) for the full diagnosis"
    )
