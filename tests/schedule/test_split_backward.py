"""A family's order with every B run as I then W in its place (pipefold.schedule.split_backward):
what the calibration's split block runs. Pure logic, one process."""

import pytest

from pipefold.errors import ScheduleError
from pipefold.schedule import Action, Op
from pipefold.schedule.lower import fuse_adjacent_split_backward
from pipefold.schedule.registry import build
from pipefold.schedule.split_backward import build_named, split_every_backward
from pipefold.simulate import CostModel, simulate


@pytest.mark.parametrize(("ranks", "microbatches"), [(1, 1), (2, 8), (3, 4), (4, 2), (4, 12)])
def test_every_b_becomes_i_then_w_in_place_holding_what_1f1b_holds(ranks, microbatches):
    plain = build("1f1b", num_ranks=ranks, num_microbatches=microbatches)
    split = build_named("1f1b+split", num_ranks=ranks, num_microbatches=microbatches)
    assert split.name == "1f1b+split" and split == split_every_backward(plain)
    for before, after in zip(plain.actions, split.actions, strict=True):
        expected = [
            part
            for action in before
            for part in (
                [Action(Op.I, action.stage, action.microbatch), Action(Op.W, action.stage, action.microbatch)]
                if action.op is Op.B
                else [action]
            )
        ]
        assert list(after) == expected
    # The activations each rank holds at its peak are 1F1B's (W frees what I left before the next F).
    costs = CostModel.uniform(ranks, f=1.0, i=1.0, w=1.0, activation_bytes=100, weight_grad_bytes=40)
    assert simulate(split, costs).activation_bytes_peak == simulate(plain, costs).activation_bytes_peak
    # The runtime fuses the first stage's pair back into B (no other rank waits for its gradient).
    fused = fuse_adjacent_split_backward(split)
    assert not any(action.op is Op.I for action in fused.actions[0])
    assert all(any(action.op is Op.I for action in row) for row in fused.actions[1:])


def test_a_family_without_a_whole_backward_or_an_unknown_one_is_refused():
    with pytest.raises(ScheduleError, match="'zb-h1' runs no whole backward"):
        build_named("zb-h1+split", num_ranks=2, num_microbatches=4)
    with pytest.raises(ScheduleError, match="unknown schedule 'nope'"):
        build_named("nope+split", num_ranks=2, num_microbatches=4)
    assert build_named("zb-h1", num_ranks=2, num_microbatches=4) == build(
        "zb-h1", num_ranks=2, num_microbatches=4
    )
