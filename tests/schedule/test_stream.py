"""Streaming runs as data: the steady state repeats per step, the unrolled run validates, and the
simulator predicts a bubble paid once per run (pure; no torch)."""

from __future__ import annotations

import pytest

from pipefold.schedule import Action, Op, ScheduleError, build, stream, validate
from pipefold.simulate import CostModel, simulate

CASES = [(2, 2, 3), (4, 4, 3), (4, 3, 2), (3, 1, 4), (4, 8, 2)]


@pytest.mark.parametrize("name", ["pipedream", "pipedream-2bw"])
@pytest.mark.parametrize(("p", "m", "steps"), CASES)
def test_the_unrolled_run_validates_and_drains_once(name, p, m, steps):
    if name == "pipedream-2bw" and m < p - 1:
        pytest.skip("refused below")
    plan = stream(name, num_ranks=p, num_microbatches=m)
    run = plan.unroll(steps)
    validate(run)
    assert run.num_microbatches == steps * m
    costs = CostModel.uniform(p, f=1, i=1, w=1)
    # Uniform costs: 1F1B over steps*m micro-batches, one fill and one drain for the whole run.
    assert simulate(run, costs).bubble_fraction == pytest.approx((p - 1) / (steps * m + p - 1))
    flushed = simulate(build("1f1b", num_ranks=p, num_microbatches=m), costs, num_steps=steps)
    if p > 1 and steps > 1:
        assert simulate(run, costs).makespan < flushed.makespan
    for rank in range(p):
        row = run.actions[rank]
        updates = [a for a in row if a.op is Op.STEP]
        assert len(updates) == steps * plan.updates_per_step
        # Before its first backward, rank r has run p-r forwards (or all there are).
        first_backward = next(i for i, a in enumerate(row) if a.op is Op.B)
        assert first_backward == min(p - rank, steps * m)
        # Steps overlap: some forward of step k+1 runs before the last backward of step k.
        if steps > 1 and rank < p - 1:
            last_b0 = row.index(Action(Op.B, rank, m - 1))
            assert row.index(Action(Op.F, rank, m)) < last_b0
        cooldown = plan.cooldown(steps)[rank]
        assert all(a.op is not Op.F for a in cooldown)
        assert sum(a.op is Op.B for a in cooldown) == min(p - 1 - rank, steps * m - 1) + 1


def test_2bw_steps_once_per_step_after_its_last_backward():
    run = stream("pipedream-2bw", num_ranks=2, num_microbatches=2).unroll(2)
    assert [str(a) for a in run.actions[0]] == [
        "F0.0", "F0.1", "B0.0", "F0.2", "B0.1", "STEP0.0", "F0.3", "B0.2", "B0.3", "STEP0.1",
    ]


def test_flush_schedules_and_too_few_microbatches_are_refused():
    with pytest.raises(ScheduleError, match=r"schedule '1f1b' cannot stream.*pipedream, pipedream-2bw"):
        stream("1f1b", num_ranks=2, num_microbatches=4)
    with pytest.raises(ScheduleError, match=r"num_microbatches=2 on 4 ranks.*num_microbatches >= 3"):
        stream("pipedream-2bw", num_ranks=4, num_microbatches=2)
    with pytest.raises(ScheduleError, match="num_steps = 0"):
        stream("pipedream", num_ranks=2, num_microbatches=2).unroll(0)
