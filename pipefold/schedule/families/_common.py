"""Helpers shared by the family generators: rows to `Schedule`, parameter checks, padding.

Private: the public surface of a family is its `generate`, `check` and `FAMILY`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate

__all__ = [
    "make_schedule",
    "require_virtual",
    "drop_microbatches",
    "counted",
    "KIND_F",
    "KIND_B",
    "KIND_I",
    "KIND_W",
    "IntRow",
    "actions_of",
]

KIND_F, KIND_B, KIND_I, KIND_W = range(4)
"""The ops of the integer generators (V schedules), numbered as `pipefold.simulate.compiled.KINDS`
numbers them: the planner reads these rows without building `Action`s (`pipefold.plan.fast_orders`)."""
_OP_OF_KIND = (Op.F, Op.B, Op.I, Op.W)

IntRow = tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]
"""One rank's order as kinds (`KIND_F` ...), stages and micro-batches."""


def actions_of(row: IntRow) -> list[Action]:
    """An integer row's `Action`s."""
    kinds, stages, microbatches = (np.asarray(column, dtype=np.int64).tolist() for column in row)
    return [Action(_OP_OF_KIND[kind], stage, microbatch)
            for kind, stage, microbatch in zip(kinds, stages, microbatches, strict=True)]


def make_schedule(
    name: str,
    num_ranks: int,
    num_microbatches: int,
    placement: tuple[int, ...],
    rows: Sequence[Iterable[Action]],
    weight_update: WeightUpdate = WeightUpdate.FLUSH,
) -> Schedule:
    """Freeze per-rank action lists into a `Schedule`."""
    return Schedule(
        name=name,
        num_ranks=num_ranks,
        num_stages=len(placement),
        num_microbatches=num_microbatches,
        placement=placement,
        actions=tuple(tuple(row) for row in rows),
        weight_update=weight_update,
    )


def require_virtual(name: str, num_virtual: int, expected: int, alternative: str) -> None:
    """Refuse a `num_virtual` the family cannot use, naming the legal value and an alternative."""
    if num_virtual != expected:
        raise ScheduleError(
            f"{name} runs {expected} stage{'s' if expected > 1 else ''} per rank; got "
            f"num_virtual={num_virtual}. Pass num_virtual={expected}, or {alternative}."
        )


def drop_microbatches(rows: Iterable[Iterable[Action]], num_microbatches: int) -> list[list[Action]]:
    """Remove every compute action of micro-batches >= `num_microbatches`.

    Families defined only for some micro-batch counts are generated for the next count
    they support and trimmed with this (docs/decisions.md, "Padding").
    """
    return [[a for a in row if a.op is Op.STEP or a.microbatch < num_microbatches] for row in rows]


def counted(op: Op, stage: int, counters: dict[tuple[Op, int], int]) -> Action:
    """The next action `op` of `stage`, micro-batches numbered in the order they are emitted."""
    microbatch = counters.get((op, stage), 0)
    counters[(op, stage)] = microbatch + 1
    return Action(op, stage, microbatch)
