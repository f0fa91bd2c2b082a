"""`probe_schedule(schedule)`: one step that measures F, B, I and W of every stage.

A cost model for `find_schedule` needs both backward forms of each stage, the whole
backward B and its halves I and W, measured (docs/decisions.md, "Probing F, B, I and W").
The probe runs `schedule` with the backward of even micro-batches split into I, W (W
right after its I) and that of odd ones whole, so one measured step holds every op of
every stage (with one micro-batch only the split form runs); it is as valid as
`schedule`. Run it with `Pipeline(..., runtime=RuntimeOptions(fuse_backward=False))`, or the
runtime fuses the adjacent halves back into B. `probe_base(placement, ...)` builds the family to probe.
"""

from __future__ import annotations

from dataclasses import replace

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate
from pipefold.schedule.placement import Placement
from pipefold.schedule.registry import build
from pipefold.schedule.validate import validate

__all__ = ["PROBE_FAMILIES", "SEARCHED", "probe_base", "probe_schedule"]

PROBE_FAMILIES: dict[Placement, str] = {"contiguous": "1f1b", "looped": "interleaved-1f1b", "v": "zb-v"}
"""The hand-written family a probe runs, per placement: 1F1B's memory, every stage busy."""

SEARCHED: dict[str, tuple[Placement, int]] = {"auto": ("contiguous", 1), "auto-v": ("v", 2)}
"""Names that ask for a schedule searched from measured costs (`pipefold train --schedule auto`,
the benchmark's rows): name -> (placement, stages per rank)."""


def probe_base(
    placement: Placement, *, num_ranks: int, num_microbatches: int, num_virtual: int
) -> Schedule:
    """The placement's probe family, built (ScheduleError names an illegal combination)."""
    if placement not in PROBE_FAMILIES:
        raise ScheduleError(f"placement = {placement!r}; use one of {', '.join(PROBE_FAMILIES)}")
    return build(
        PROBE_FAMILIES[placement],
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        num_virtual=num_virtual,
    )


def probe_schedule(schedule: Schedule) -> Schedule:
    """`schedule` with I, W on even micro-batches and B on odd ones; validated."""
    if schedule.weight_update is not WeightUpdate.FLUSH:
        raise ScheduleError(
            f"schedule {schedule.name!r} updates weights inside the step; probe a flush schedule "
            "(gpipe, 1f1b, zb-h1, ...), which is what find_schedule searches"
        )
    rows: list[tuple[Action, ...]] = []
    for row in schedule.actions:
        probed: list[Action] = []
        for action in row:
            split = action.microbatch % 2 == 0
            if action.op is Op.B and split:
                probed += [Action(Op.I, action.stage, action.microbatch)]
                probed += [Action(Op.W, action.stage, action.microbatch)]
            elif action.op is Op.I and not split:
                # B where I was: everything after it only needed I's input gradient, which B also ships.
                probed.append(Action(Op.B, action.stage, action.microbatch))
            elif action.op is Op.W and not split:
                continue  # done by the B above
            else:
                probed.append(action)
        rows.append(tuple(probed))
    probe = replace(schedule, name=f"{schedule.name}+probe", actions=tuple(rows))
    validate(probe)
    return probe
