"""`validate(schedule)`: prove a schedule is runnable before anything runs.

Checks, in order, each failing with a `ScheduleError` that draws the rank x step
grid with the offending cell in brackets:
1. only compute (and sharding) ops, each on the rank that owns its stage, within range;
2. every (stage, micro-batch) has exactly one F and exactly one backward
   (a B, or an I and a W), nothing twice;
3. STEP appears only in asynchronous schedules (flush schedules leave the
   optimizer step to the caller, after the call), at most once per (stage, index);
4. under full sharding (`pipefold.schedule.shard`), every compute action of a sharded stage
   runs between an UNSHARD and a RESHARD, and its gradients are reduced once, last;
5. the derived communication cannot deadlock: executing every rank's actions in
   order, each waiting for the actions it consumes (docs/decisions.md, "Derived
   dependencies" and "Send/recv semantics"), runs to completion. Same-rank order
   (F before B, I before W) is covered by this too.
"""

from __future__ import annotations

from collections import Counter

from pipefold.errors import ScheduleError
from pipefold.schedule.deps import backward_of, data_inputs
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate, format_grid
from pipefold.schedule.shard import check_sharding

__all__ = ["validate"]


def _fail(schedule: Schedule, message: str, cell: tuple[int, int] | None) -> ScheduleError:
    return ScheduleError(
        f"{schedule.name or 'schedule'} (ranks={schedule.num_ranks}, stages={schedule.num_stages}, "
        f"microbatches={schedule.num_microbatches}): {message}\n"
        f"{format_grid(schedule.actions, mark=cell)}"
    )


def _check_cells(schedule: Schedule) -> dict[Action, tuple[int, int]]:
    where: dict[Action, tuple[int, int]] = {}
    for rank, position, action in schedule.iter_actions():
        cell = (rank, position)
        if not (action.op.is_compute or action.op.is_sharding):
            raise _fail(
                schedule,
                f"{action} is a communication action; schedules hold compute actions only "
                "(communication is derived by lower())",
                cell,
            )
        if action.stage >= schedule.num_stages:
            raise _fail(
                schedule, f"{action}: stage {action.stage} >= num_stages {schedule.num_stages}", cell
            )
        counted = action.op is Op.STEP or action.op.is_sharding  # numbered per stage, not micro-batches
        if not counted and action.microbatch >= schedule.num_microbatches:
            raise _fail(
                schedule,
                f"{action}: micro-batch {action.microbatch} >= num_microbatches "
                f"{schedule.num_microbatches}",
                cell,
            )
        owner = schedule.rank_of(action.stage)
        if owner != rank:
            raise _fail(
                schedule,
                f"{action} is on rank {rank} but stage {action.stage} is placed on rank {owner}",
                cell,
            )
        if action in where:
            first = where[action]
            raise _fail(
                schedule, f"{action} appears twice (first at rank {first[0]}, step {first[1]})", cell
            )
        if action.op is Op.STEP and schedule.weight_update is WeightUpdate.FLUSH:
            raise _fail(
                schedule,
                f"{action}: a flush schedule has no STEP actions; the caller steps the optimizer "
                "after the call (use weight_update='stash' or 'double-buffer' for in-pipeline updates)",
                cell,
            )
        where[action] = cell
    return where


def _check_coverage(schedule: Schedule, where: dict[Action, tuple[int, int]]) -> None:
    ops = Counter((a.stage, a.microbatch, a.op) for a in where if a.op.is_compute and a.op is not Op.STEP)
    for stage in range(schedule.num_stages):
        for microbatch in range(schedule.num_microbatches):
            has = {op for op in (Op.F, Op.B, Op.I, Op.W) if ops[(stage, microbatch, op)]}
            label = f"stage {stage}, micro-batch {microbatch}"
            if Op.F not in has:
                raise _fail(schedule, f"{label} has no forward F{stage}.{microbatch}", None)
            if Op.B in has and (Op.I in has or Op.W in has):
                cell = where.get(Action(Op.B, stage, microbatch))
                raise _fail(schedule, f"{label} has both a B and a split backward (I/W)", cell)
            if Op.B not in has and has & {Op.I, Op.W} != {Op.I, Op.W}:
                missing = "a backward (B, or I and W)" if not has - {Op.F} else (
                    f"W{stage}.{microbatch}" if Op.W not in has else f"I{stage}.{microbatch}"
                )
                raise _fail(schedule, f"{label} is missing {missing}", None)


def _check_progress(schedule: Schedule) -> None:
    """Run every rank in order with unit-free 'done' flags; stuck means deadlock or bad order."""
    backward = backward_of(schedule)
    inputs = {
        action: data_inputs(action, schedule, backward)
        for _, _, action in schedule.iter_actions()
    }
    done: set[Action] = set()
    positions = [0] * schedule.num_ranks
    remaining = sum(len(row) for row in schedule.actions)
    while remaining:
        progressed = False
        for rank, row in enumerate(schedule.actions):
            while positions[rank] < len(row):
                action = row[positions[rank]]
                if not all(needed in done for needed in inputs[action]):
                    break
                done.add(action)
                positions[rank] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    if not remaining:
        return
    blocked = {
        rank: positions[rank]
        for rank, row in enumerate(schedule.actions)
        if positions[rank] < len(row)
    }
    # Follow the wait chain from the first stuck rank to its root: a rank waiting on its own
    # later action, or the first rank seen twice (a cycle across ranks).
    rank = next(iter(blocked))
    seen: list[int] = []
    while True:
        action = schedule.actions[rank][blocked[rank]]
        missing = next(needed for needed in inputs[action] if needed not in done)
        owner = schedule.rank_of(missing.stage)
        if owner == rank:
            reason = f"it needs {missing}, which this rank runs later"
            break
        if owner in seen or owner not in blocked:
            reason = f"it needs {missing} from rank {owner}, which is itself blocked (a cycle)"
            break
        seen.append(rank)
        rank = owner
    others = ", ".join(
        f"rank {r} at {schedule.actions[r][p]}" for r, p in blocked.items() if r != rank
    )
    raise _fail(
        schedule,
        f"deadlock: rank {rank} waits forever at {action}: {reason}"
        + (f" (also stuck: {others})" if others else ""),
        (rank, blocked[rank]),
    )


def validate(schedule: Schedule) -> None:
    """Raise `ScheduleError` unless `schedule` is complete, consistent and deadlock-free."""
    where = _check_cells(schedule)
    _check_coverage(schedule, where)
    _check_progress(schedule)
    check_sharding(schedule)
