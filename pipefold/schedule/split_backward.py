"""A family's order with every whole backward run as its two halves: what the planner's
calibration measures the split backward's own cost on.

    build_named("1f1b+split", num_ranks=2, num_microbatches=8)   # 1F1B, each B as I then W
    split_every_backward(build("1f1b", num_ranks=2, num_microbatches=8))   # the same

Splitting a backward into I and W costs something of its own (the weight half re-enters the
graph). A zero-bubble family (zb-h1) measures it only together with what its order changes
beside the split: W deferred, so its later ranks hold more activations, which on a CPU host
slows them too. With each B run as I then W, in B's place, nothing else changes: the same
actions, the same order, the same activations held (I frees part of what B frees, W the rest,
before the next action), so what the halves take beyond B is the split's own. The runtime runs a
pair that nothing separates as one B where no other rank waits for I's gradient
(`fuse_adjacent_split_backward`: the first stage), so those stages measure B.
"""

from __future__ import annotations

from dataclasses import replace

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Action, Op, Schedule
from pipefold.schedule.registry import build
from pipefold.schedule.validate import validate

__all__ = ["SPLIT_SUFFIX", "build_named", "split_every_backward"]

SPLIT_SUFFIX = "+split"
"""A family name with this suffix (`"1f1b+split"`) names the family with every B split in place."""


def split_every_backward(schedule: Schedule) -> Schedule:
    """`schedule` with each `B(s, m)` replaced by `I(s, m)` then `W(s, m)` in its place, named
    `name + SPLIT_SUFFIX`; validated. Refused where it has no B to split."""
    if not any(action.op is Op.B for row in schedule.actions for action in row):
        raise ScheduleError(
            f"schedule {schedule.name!r} runs no whole backward (B) to split; give a family that does (1f1b)"
        )
    rows = tuple(
        tuple(
            part
            for action in row
            for part in (
                (Action(Op.I, action.stage, action.microbatch), Action(Op.W, action.stage, action.microbatch))
                if action.op is Op.B
                else (action,)
            )
        )
        for row in schedule.actions
    )
    split = replace(schedule, name=f"{schedule.name}{SPLIT_SUFFIX}", actions=rows)
    validate(split)
    return split


def build_named(
    name: str, *, num_ranks: int, num_microbatches: int, num_virtual: int | None = None
) -> Schedule:
    """`build(name, ...)`, or for `FAMILY+split` that family's schedule with every B split
    (`split_every_backward`); an unknown family is refused by `build` (ScheduleError)."""
    if name.endswith(SPLIT_SUFFIX):
        base = build(
            name[: -len(SPLIT_SUFFIX)],
            num_ranks=num_ranks,
            num_microbatches=num_microbatches,
            num_virtual=num_virtual,
        )
        return split_every_backward(base)
    return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)
