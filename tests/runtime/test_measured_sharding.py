"""A sharded run's timeline gives the cost model its gather and reduce-scatter times back (one
process: a simulated timeline stands in for a measured one, whose waits the executor records
the same way)."""

from __future__ import annotations

import pytest

from pipefold.runtime.measured import measured_cost_model, measured_gathers
from pipefold.schedule import add_sharding, build
from pipefold.simulate import CostModel, simulate


@pytest.mark.parametrize("lookahead", [0, 2])
def test_gather_and_reduce_scatter_times_come_back_from_the_timeline(lookahead):
    schedule = add_sharding(build("1f1b", num_ranks=2, num_microbatches=4), lookahead=lookahead)
    truth = CostModel.from_lists([1.0, 2.0], [1.0, 1.0], [1.0, 1.0], gather=[0.5, 0.25],
                                 reduce_scatter=[0.3, 0.7])
    timeline = simulate(schedule, truth)
    costs = measured_cost_model(timeline, schedule, with_link=False, num_cores=None)
    assert costs.reduce_scatter == pytest.approx(truth.reduce_scatter)
    # Stage 0's gather: from its UNSHARD to the end of F0.0's wait. Stage 1's F1.0 also waits for
    # F0.0's output, which arrives later than the gather: its wait bounds the gather from above.
    assert costs.gather[0] == pytest.approx(0.5)
    assert costs.gather[1] >= 0.25
    assert simulate(schedule, costs).makespan == pytest.approx(timeline.makespan)


def test_a_schedule_without_sharding_actions_measures_no_gathers():
    schedule = build("1f1b", num_ranks=2, num_microbatches=4)
    timeline = simulate(schedule, CostModel.uniform(2))
    assert not measured_gathers([timeline], schedule)
    assert measured_cost_model(timeline, schedule, with_link=False, num_cores=None).gather == (0.0, 0.0)
