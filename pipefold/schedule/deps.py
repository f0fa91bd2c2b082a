"""Data dependencies between the compute actions of a schedule.

Dependencies and messages follow from the model being a chain of stages; nobody writes
them by hand (docs/decisions.md, "Derived dependencies").
"""

from __future__ import annotations

from pipefold.schedule.ir import Action, Op, Schedule

__all__ = ["backward_of", "data_inputs", "message_source"]


def backward_of(schedule: Schedule) -> dict[tuple[int, int], Action]:
    """Map (stage, microbatch) to the action that produces its input gradient (B or I)."""
    found: dict[tuple[int, int], Action] = {}
    for _, _, action in schedule.iter_actions():
        if action.op.is_backward:
            found[(action.stage, action.microbatch)] = action
    return found


def data_inputs(
    action: Action, schedule: Schedule, backward: dict[tuple[int, int], Action]
) -> tuple[Action, ...]:
    """The actions whose results `action` consumes (see docs/decisions.md, "Derived dependencies").

    `backward` is `backward_of(schedule)`, passed in so callers compute it once.
    Dependencies on actions missing from the schedule are still returned; the
    validator reports them.
    """
    stage, microbatch = action.stage, action.microbatch
    if action.op is Op.F:
        return (Action(Op.F, stage - 1, microbatch),) if stage > 0 else ()
    if action.op.is_backward:
        inputs = [Action(Op.F, stage, microbatch)]
        if stage < schedule.num_stages - 1:
            inputs.append(backward.get((stage + 1, microbatch), Action(Op.B, stage + 1, microbatch)))
        return tuple(inputs)
    if action.op is Op.W:
        return (Action(Op.I, stage, microbatch),)
    return ()


def message_source(action: Action, schedule: Schedule) -> int | None:
    """The rank `action` receives its cross-rank input from, or None if it needs no message."""
    if action.op is Op.F and action.stage > 0:
        peer = schedule.rank_of(action.stage - 1)
    elif action.op.is_backward and action.stage < schedule.num_stages - 1:
        peer = schedule.rank_of(action.stage + 1)
    else:
        return None
    return None if peer == schedule.rank_of(action.stage) else peer
