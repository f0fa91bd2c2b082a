"""The IR: action text round-trips, placements, schedule shape checks, the grid."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.schedule import (
    Action,
    Op,
    Schedule,
    contiguous_placement,
    format_grid,
    looped_placement,
    v_placement,
)


@given(st.sampled_from(list(Op)), st.integers(0, 999), st.integers(0, 999))
def test_action_text_round_trips(op, stage, microbatch):
    action = Action(op, stage, microbatch)
    assert Action.parse(str(action)) == action


def test_action_text_form():
    assert str(Action(Op.F, 3, 7)) == "F3.7"
    assert str(Action(Op.SEND_B, 1, 0)) == "SEND_B1.0"
    assert Action.parse(" W2.5 ") == Action(Op.W, 2, 5)


@pytest.mark.parametrize("text", ["F3", "X1.2", "F-1.0", "F1.2.3", "", "send_f1.0"])
def test_action_parse_refuses_garbage(text):
    with pytest.raises(ScheduleError, match="cannot parse action"):
        Action.parse(text)


def test_negative_indices_refused():
    with pytest.raises(ScheduleError, match="must be >= 0"):
        Action(Op.F, -1, 0)


def test_op_kinds():
    assert {op for op in Op if op.is_compute} == {Op.F, Op.B, Op.I, Op.W, Op.STEP}
    assert {op for op in Op if op.is_backward} == {Op.B, Op.I}


def test_placements():
    assert contiguous_placement(3) == (0, 1, 2)
    assert looped_placement(2, 3) == (0, 1, 0, 1, 0, 1)
    assert v_placement(3, 2) == (0, 1, 2, 2, 1, 0)
    assert v_placement(2, 4) == (0, 1, 1, 0, 0, 1, 1, 0)


def _tiny(actions, placement=(0, 1)):
    return Schedule("t", len(actions), len(placement), 1, placement, actions)


def test_schedule_shape_errors_name_the_field():
    with pytest.raises(ScheduleError, match="placement has 1 entries but num_stages is 2"):
        Schedule("t", 2, 2, 1, (0,), ((), ()))
    with pytest.raises(ScheduleError, match=r"placement\[1\] = 5"):
        Schedule("t", 2, 2, 1, (0, 5), ((), ()))
    with pytest.raises(ScheduleError, match="actions has 1 rank rows"):
        Schedule("t", 2, 2, 1, (0, 1), ((),))


def test_stages_of_and_virtual():
    schedule = Schedule("t", 2, 4, 1, looped_placement(2, 2), ((), ()))
    assert schedule.num_virtual == 2
    assert schedule.stages_of(0) == (0, 2)
    assert schedule.stages_of(1) == (1, 3)


def test_grid_marks_a_cell():
    rows = ((Action(Op.F, 0, 0), Action(Op.B, 0, 0)), (Action(Op.F, 1, 0),))
    assert format_grid(rows, mark=(0, 1)) == (
        "       0      1\n"
        "rank 0 F0.0   [B0.0]\n"
        "rank 1 F1.0"
    )
