"""The local search behind `search_schedule`: simulate an order, then improve it move by move.

`Evaluator(problem).score(rows)` simulates per-rank orders once each (None when they
deadlock or break the memory cap); `local_search(evaluator, start, deadline)` climbs
from a scored start by pulling actions into idle gaps, swapping neighbours and fusing
I, W into B, while the simulated makespan (then peak memory) drops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipefold.errors import ScheduleError
from pipefold.plan.list_scheduler import Problem
from pipefold.schedule.ir import Action, Op, Schedule
from pipefold.simulate.engine import simulate

__all__ = ["Evaluator", "Scored", "local_search"]

# Makespans closer than this (relative) tie; float sums of the same costs in another order differ
# in the last bits, and such a difference is no reason to prefer one schedule.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Scored:
    rows: tuple[tuple[Action, ...], ...]
    makespan: float
    peak: tuple[int, ...]
    bubble_fraction: float
    waited: tuple[tuple[Action, ...], ...]
    """Per rank, the actions the rank sat idle before (waiting for their input)."""

    def beats(self, other: Scored) -> bool:
        margin = _TOLERANCE * max(1.0, other.makespan)
        if self.makespan < other.makespan - margin:
            return True
        return self.makespan <= other.makespan + margin and max(self.peak) < max(other.peak)


class Evaluator:
    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.count = 0
        # Many list-scheduler settings produce the same orders; each is simulated once.
        self._seen: dict[tuple[tuple[Action, ...], ...], Scored | None] = {}

    def schedule(self, rows: tuple[tuple[Action, ...], ...]) -> Schedule:
        problem = self.problem
        return Schedule(
            name="auto",
            num_ranks=problem.num_ranks,
            num_stages=problem.num_stages,
            num_microbatches=problem.num_microbatches,
            placement=problem.placement,
            actions=rows,
        )

    def score(self, rows: tuple[tuple[Action, ...], ...]) -> Scored | None:
        """The simulated makespan and peak, or None if `rows` deadlock or break the cap."""
        if rows not in self._seen:
            self._seen[rows] = self._simulate(rows)
        return self._seen[rows]

    def _simulate(self, rows: tuple[tuple[Action, ...], ...]) -> Scored | None:
        self.count += 1
        try:
            timeline = simulate(self.schedule(rows), self.problem.memory_costs)
        except ScheduleError:
            return None
        peak = timeline.activation_bytes_peak
        if max(peak) > self.problem.cap:
            return None
        waited = tuple(tuple(wait.waiting_for for wait in row) for row in timeline.waits)
        return Scored(rows, timeline.makespan, peak, timeline.bubble_fraction, waited)


# How far ahead in a rank's order the search looks for an action to pull into an idle gap:
# beyond a few positions the pulled action almost always depends on one it would overtake.
_PULL_WINDOW = 8


def _moves(best: Scored) -> Iterator[tuple[int, tuple[Action, ...]]]:
    """(rank, new row) one move from `best`, the likeliest first.

    First pull a later action into each gap where a rank waits (a W into the gap is the
    ZB paper's W filling; a forward there runs ahead of a slow neighbour), then swap
    adjacent actions or fuse an adjacent I, W pair into B.
    """
    for rank, row in enumerate(best.rows):
        position_of = {action: position for position, action in enumerate(row)}
        for waited in best.waited[rank]:
            gap = position_of[waited]
            overtaken: set[tuple[int, int]] = set()
            for position in range(gap, min(len(row) - 1, gap + _PULL_WINDOW)):
                overtaken.add((row[position].stage, row[position].microbatch))
                pulled = row[position + 1]
                if (pulled.stage, pulled.microbatch) not in overtaken:
                    yield rank, row[:gap] + (pulled,) + row[gap : position + 1] + row[position + 2 :]
    for rank, row in enumerate(best.rows):
        for position in range(len(row) - 1):
            for moved in _neighbours(row, position):
                yield rank, moved


def _neighbours(row: tuple[Action, ...], position: int) -> list[tuple[Action, ...]]:
    """Rows one local move away at `position`: swap it with the next action, or fuse I, W into B."""
    first, second = row[position], row[position + 1]
    found = []
    same_work = (first.stage, first.microbatch) == (second.stage, second.microbatch)
    if first.op is Op.I and second.op is Op.W and same_work:
        fused = Action(Op.B, first.stage, first.microbatch)
        found.append(row[:position] + (fused,) + row[position + 2 :])
    # Same (stage, micro-batch) actions depend on each other; two W's or two forwards of one
    # stage swap to the same timing (or only reorder micro-batches), so they are not tried.
    pointless = (first.op is Op.W and second.op is Op.W) or (
        first.op is Op.F and second.op is Op.F and first.stage == second.stage
    )
    if not same_work and not pointless:
        found.append(row[:position] + (second, first) + row[position + 2 :])
    return found


def local_search(evaluator: Evaluator, start: Scored, deadline: float) -> tuple[Scored, int]:
    """First-improvement hill climbing over `_moves` until none improves or time is up.

    Every kept move strictly lowers (makespan, peak), so the climb ends without a deadline too.
    """
    best, moves = start, 0
    while True:
        for rank, row in _moves(best):
            if time.perf_counter() > deadline:
                return best, moves
            trial = evaluator.score(best.rows[:rank] + (row,) + best.rows[rank + 1 :])
            if trial is not None and trial.beats(best):
                best, moves = trial, moves + 1
                break
        else:
            return best, moves
