"""Re-tuning during training (pipefold/job/retune.py): the search, the trial, keeping and reverting.

One process, no process group: timelines simulated from known costs stand in for measured
ones, and a stand-in pipeline records which schedule it is told to run.
"""

import pytest

from pipefold.job.retune import RETUNE_GAIN, Retuner
from pipefold.schedule import build
from pipefold.simulate import CostModel, simulate


class FakePipeline:
    def __init__(self, schedule):
        self.schedule = schedule
        self.ran = [schedule.name]

    def use_schedule(self, schedule):
        self.schedule = schedule
        self.ran.append(schedule.name)


# A large weight-gradient half: zero-bubble orders fill 1F1B's bubble with W.
COSTS = CostModel.from_lists([1.0, 1.0], [1.0, 1.0], [1.0, 1.0])


def _timelines(schedule, count):
    return [simulate(schedule, COSTS)] * count


def test_a_faster_order_is_tried_and_kept_when_the_steps_after_are_faster():
    pipe = FakePipeline(build("1f1b", num_ranks=2, num_microbatches=4))
    retuner = Retuner(pipe, every=2)
    before = simulate(pipe.schedule, COSTS).makespan
    assert retuner.due(2, 10) and not retuner.due(3, 10) and not retuner.due(10, 10)
    assert retuner.after_steps(2, _timelines(pipe.schedule, 2), [before] * 2)
    (change,) = retuner.changes
    assert change["from"] == "1f1b" and pipe.ran == ["1f1b", change["to"]]
    assert change["predicted_after_s"] < change["predicted_before_s"] * (1 - RETUNE_GAIN)
    assert change["measured_before_s"] == before
    # The two steps under the new order ran faster: kept, nothing else changes.
    assert not retuner.after_steps(4, _timelines(pipe.schedule, 2), [before] * 2 + [before * 0.8] * 2)
    assert change["kept"] is True and change["measured_after_s"] == pytest.approx(before * 0.8)
    assert pipe.ran == ["1f1b", change["to"]]
    assert retuner.due(6, 10)  # it searches again later


def test_an_order_that_runs_slower_is_undone_and_re_tuning_stops():
    pipe = FakePipeline(build("1f1b", num_ranks=2, num_microbatches=4))
    retuner = Retuner(pipe, every=2)
    assert retuner.after_steps(2, _timelines(pipe.schedule, 2), [1.0, 1.0])
    assert retuner.after_steps(4, _timelines(pipe.schedule, 2), [1.0, 1.0, 1.3, 1.2])
    (change,) = retuner.changes
    assert change["kept"] is False and pipe.ran[-1] == "1f1b"
    assert not retuner.due(6, 10)


def test_no_switch_where_the_running_order_is_already_as_fast():
    pipe = FakePipeline(build("zb-h2", num_ranks=2, num_microbatches=4))
    retuner = Retuner(pipe, every=2)
    assert not retuner.after_steps(2, _timelines(pipe.schedule, 2), [1.0, 1.0])
    assert retuner.changes == [] and pipe.ran == ["zb-h2"]
