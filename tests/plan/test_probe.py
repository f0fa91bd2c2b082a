"""`probe_schedule`: every flush family stays valid and every stage runs F, B, I and W."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.plan import probe_schedule
from pipefold.schedule import Op, WeightUpdate, build, names, validate

FLUSH = [n for n in names() if build(n, num_ranks=2, num_microbatches=2).weight_update is WeightUpdate.FLUSH]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(FLUSH),
    num_ranks=st.integers(1, 4),
    num_microbatches=st.integers(1, 9),
)
def test_probe_is_valid_and_times_every_op_of_every_stage(name, num_ranks, num_microbatches):
    try:
        base = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches)
    except ScheduleError:
        return  # outside the family's legal range
    probe = probe_schedule(base)
    validate(probe)
    assert probe.placement == base.placement and probe.num_microbatches == base.num_microbatches
    ops = Counter((a.op, a.stage) for row in probe.actions for a in row)
    for stage in range(probe.num_stages):
        assert ops[(Op.F, stage)] == num_microbatches
        # Even micro-batches split, odd ones whole; with one micro-batch only the split runs.
        assert ops[(Op.I, stage)] == ops[(Op.W, stage)] == (num_microbatches + 1) // 2
        assert ops[(Op.B, stage)] == num_microbatches // 2


def test_probe_refuses_an_asynchronous_schedule():
    with pytest.raises(ScheduleError, match="flush schedule"):
        probe_schedule(build("pipedream", num_ranks=2, num_microbatches=4))
