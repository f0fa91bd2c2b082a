"""Data dependencies between the compute actions of a schedule.

[Note: derived dependencies]
Nobody writes dependencies or communication by hand. They follow from the model
being a chain of stages:
  F(s, m)        consumes the output of F(s-1, m)                  (s > 0)
  B/I(s, m)      consumes what F(s, m) saved, and the input gradient
                 produced by the backward (B or I) of (s+1, m)     (s < S-1)
  W(s, m)        consumes what I(s, m) kept
  STEP(s, k)     has no data input; it is ordered on its rank only.
An edge between stages on different ranks is a message; on the same rank the
tensor is handed over in memory.
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
    """The actions whose results `action` consumes (see [Note: derived dependencies]).

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
