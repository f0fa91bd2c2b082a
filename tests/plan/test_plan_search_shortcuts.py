"""The search's shortcuts read what generating would tell: each family's backward kind without its
order (`pipefold.plan.orders.family_backward`), and each rank's weights with tied ones held once in
one pass (`pipefold.plan.memory.static_weight_bytes` against `CostModel.held_weight_bytes`)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.plan.memory import static_weight_bytes
from pipefold.plan.orders import _FIXED_BACKWARD, family_backward, generated_backward
from pipefold.schedule import names
from pipefold.schedule.registry import family
from pipefold.simulate import CostModel

SIZES = [(1, 1), (1, 4), (2, 1), (2, 3), (3, 7), (4, 4), (4, 9), (8, 16), (5, 64), (16, 17), (32, 64),
         (64, 128)]


@pytest.mark.parametrize("name", sorted(_FIXED_BACKWARD))
def test_fixed_backward_is_the_generated_one(name):
    # Small sizes come from validated `Schedule`s, those over 256 ranks x micro-batches from the
    # integer generators (`pipefold.plan.fast_orders`): both paths are checked.
    checked = 0
    for num_ranks, num_microbatches in SIZES:
        for num_virtual in (1, 2, 3, 4):
            try:
                family(name).check(num_ranks, num_microbatches, num_virtual)
            except ScheduleError:
                continue
            generated = generated_backward(name, num_ranks, num_microbatches, num_virtual)
            assert family_backward(name, num_ranks, num_microbatches, num_virtual) == generated, (
                name, num_ranks, num_microbatches, num_virtual)
            checked += 1
    assert checked >= 4


def test_every_family_is_fixed_or_generated():
    # A family left out of the table is read from its order: dualpipe-v's kind depends on the size.
    assert set(_FIXED_BACKWARD) <= set(names())
    kinds = {generated_backward("dualpipe-v", p, m, 2) for p, m in [(1, 1), (2, 8), (4, 16)]}
    assert len(kinds) > 1


def test_fixed_backward_refuses_bad_sizes():
    with pytest.raises(ScheduleError):
        family_backward("naive", 2, 4, 2)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_ranks=st.integers(1, 5), num_stages=st.integers(1, 9))
def test_owned_weights_hold_each_tied_weight_once(data, num_ranks, num_stages):
    placement = tuple(data.draw(st.lists(st.integers(0, num_ranks - 1), min_size=num_stages,
                                         max_size=num_stages)))
    stage = st.integers(0, num_stages - 1)
    tied = data.draw(st.lists(st.tuples(st.lists(st.tuples(stage, st.integers(1, 3)), min_size=1, max_size=4),
                                        st.integers(0, 500)), max_size=3))
    model = CostModel.from_lists(
        [1.0] * num_stages, [1.0] * num_stages, [1.0] * num_stages,
        weight_bytes=data.draw(st.lists(st.integers(500, 5000), min_size=num_stages, max_size=num_stages)),
        tied_weights=tuple((tuple(counts), size) for counts, size in tied),
    )
    expected = [model.held_weight_bytes([s for s, owner in enumerate(placement) if owner == rank])
                for rank in range(num_ranks)]
    assert static_weight_bytes(model, placement, num_ranks) == expected
