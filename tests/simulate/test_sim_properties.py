"""Properties of `simulate` over every registered family and legal (p, m, v).

For random per-stage costs and link latency: the simulation terminates; each rank's
busy time is the sum of its actions' costs; the makespan is at least the longest
dependency chain and at least every rank's total work; no rank runs two actions at
once; no action starts before its inputs have arrived; memory counters agree.
"""

import functools

import pytest
from _checks import assert_inputs_arrived
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.schedule import WeightUpdate, build, names
from pipefold.schedule.deps import backward_of, data_inputs
from pipefold.simulate import CostModel, Link, simulate

FAMILIES = names()
EPS = 1e-9


def critical_path(schedule, costs):
    """Longest chain of data dependencies, counting link delays, ignoring rank order."""
    backward = backward_of(schedule)
    present = {action for _, _, action in schedule.iter_actions()}

    @functools.cache
    def finish(action):
        ready = 0.0
        for producer in data_inputs(action, schedule, backward):
            if producer in present:
                boundary = min(producer.stage, action.stage)
                src, dst = schedule.rank_of(producer.stage), schedule.rank_of(action.stage)
                delay = costs.transfer_time(boundary, src, dst)
                ready = max(ready, finish(producer) + delay)
        return ready + costs.time_of(action)

    return max((finish(action) for action in present), default=0.0)


def build_or_reject(name, p, m, v):
    try:
        return build(name, num_ranks=p, num_microbatches=m, num_virtual=v)
    except ScheduleError:
        return None


times = st.floats(min_value=0.0, max_value=4.0, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("name", FAMILIES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    p=st.integers(1, 8),
    m=st.integers(1, 32),
    v=st.integers(1, 4),
    data=st.data(),
    sync=st.booleans(),
    num_steps=st.integers(1, 2),
)
def test_simulation_invariants(name, p, m, v, data, sync, num_steps):
    schedule = build_or_reject(name, p, m, v)
    if schedule is None:
        schedule = build_or_reject(name, p, m, None)  # the family's own v, so each run tests something
    if schedule is None:
        return
    n = schedule.num_stages
    stage_times = st.lists(times, min_size=n, max_size=n)
    costs = CostModel.from_lists(
        data.draw(stage_times, label="f"),
        data.draw(stage_times, label="i"),
        data.draw(stage_times, label="w"),
        step=data.draw(stage_times, label="step"),
        activation_bytes=[1] * n,
        link=Link(latency=data.draw(st.floats(0.0, 2.0), label="latency")),
    )
    timeline = simulate(schedule, costs, num_steps=num_steps, sync=sync)

    for rank, row in enumerate(schedule.actions):
        events = timeline.events[rank]
        assert [e.action for e in events] == list(row) * num_steps
        expected = num_steps * sum(costs.time_of(action) for action in row)
        assert timeline.busy_time(rank) == pytest.approx(expected, abs=1e-6)
        assert timeline.makespan >= timeline.busy_time(rank) - 1e-6
        for before, after in zip(events, events[1:], strict=False):
            assert after.start >= before.end - EPS  # one action at a time, in order
        for wait in timeline.waits[rank]:
            assert wait.end > wait.start

    assert timeline.makespan >= critical_path(schedule, costs) - 1e-6

    # One byte per activation: the byte count and the micro-batch count must agree.
    in_flight = [timeline.peak_activations(rank) for rank in range(p)]
    assert list(timeline.activation_bytes_peak) == in_flight
    for rank in range(p):
        held = timeline.weight_versions_peak[rank]
        if schedule.weight_update is WeightUpdate.FLUSH:
            assert held == 1
        else:
            assert 1 <= held <= in_flight[rank] + 1

    assert_inputs_arrived(timeline, schedule, costs)
