"""The validator refuses every kind of broken schedule, pointing at the cell."""

import pytest

from pipefold.errors import ScheduleError
from pipefold.schedule import Action, Schedule, WeightUpdate, validate

F, B, I, W = (lambda s, m, op=op: Action.parse(f"{op}{s}.{m}") for op in "FBIW")


def two_rank(rows, microbatches=1, weight_update=WeightUpdate.FLUSH):
    return Schedule("t", 2, 2, microbatches, (0, 1), tuple(tuple(r) for r in rows), weight_update)


def test_valid_two_stage_schedule_passes():
    validate(two_rank([[F(0, 0), B(0, 0)], [F(1, 0), B(1, 0)]]))


def test_split_backward_passes():
    validate(two_rank([[F(0, 0), I(0, 0), W(0, 0)], [F(1, 0), I(1, 0), W(1, 0)]]))


def test_missing_backward_is_named():
    with pytest.raises(ScheduleError, match="stage 1, micro-batch 0 is missing a backward"):
        validate(two_rank([[F(0, 0), B(0, 0)], [F(1, 0)]]))


def test_missing_w_is_named():
    with pytest.raises(ScheduleError, match="missing W1.0"):
        validate(two_rank([[F(0, 0), B(0, 0)], [F(1, 0), I(1, 0)]]))


def test_b_and_split_together_refused():
    with pytest.raises(ScheduleError, match="both a B and a split"):
        validate(two_rank([[F(0, 0), B(0, 0)], [F(1, 0), B(1, 0), I(1, 0), W(1, 0)]]))


def test_duplicate_refused_with_cell_marked():
    with pytest.raises(ScheduleError, match=r"F0.0 appears twice") as info:
        validate(two_rank([[F(0, 0), F(0, 0), B(0, 0)], [F(1, 0), B(1, 0)]]))
    assert "[F0.0]" in str(info.value)


def test_wrong_rank_refused():
    with pytest.raises(ScheduleError, match="F1.0 is on rank 0 but stage 1 is placed on rank 1"):
        validate(two_rank([[F(0, 0), F(1, 0), B(0, 0)], [B(1, 0)]]))


def test_out_of_range_microbatch():
    with pytest.raises(ScheduleError, match="micro-batch 1 >= num_microbatches 1"):
        validate(two_rank([[F(0, 0), F(0, 1), B(0, 0)], [F(1, 0), B(1, 0)]]))


def test_communication_actions_refused():
    with pytest.raises(ScheduleError, match="communication action"):
        validate(two_rank([[F(0, 0), Action.parse("SEND_F0.0"), B(0, 0)], [F(1, 0), B(1, 0)]]))


def test_step_refused_in_flush_schedule():
    with pytest.raises(ScheduleError, match="flush schedule has no STEP"):
        validate(two_rank([[F(0, 0), B(0, 0), Action.parse("STEP0.0")], [F(1, 0), B(1, 0)]]))


def test_step_allowed_when_stashing():
    validate(
        two_rank(
            [[F(0, 0), B(0, 0), Action.parse("STEP0.0")], [F(1, 0), B(1, 0), Action.parse("STEP1.0")]],
            weight_update=WeightUpdate.STASH,
        )
    )


def test_backward_before_forward_on_same_rank_is_a_deadlock():
    with pytest.raises(
        ScheduleError, match="rank 1 waits forever at B1.0: it needs F1.0, which this rank runs later"
    ):
        validate(two_rank([[F(0, 0), B(0, 0)], [B(1, 0), F(1, 0)]]))


def test_cross_rank_cycle_is_a_deadlock():
    # Rank 0 wants micro-batch 1's gradient before sending micro-batch 1's activation.
    rows = [
        [F(0, 0), B(0, 1), F(0, 1), B(0, 0)],
        [F(1, 0), F(1, 1), B(1, 1), B(1, 0)],
    ]
    with pytest.raises(ScheduleError, match="deadlock: rank 0 waits forever at B0.1") as info:
        validate(two_rank(rows, microbatches=2))
    assert "[B0.1]" in str(info.value)
    assert "also stuck: rank 1 at F1.1" in str(info.value)
