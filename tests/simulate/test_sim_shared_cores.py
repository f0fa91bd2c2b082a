"""Ranks that share cores (docs/decisions.md, "Shared cores"), over every
registered family and legal (p, m, v), for random per-stage costs and link latency:

- with as many cores as ranks, the event-to-event engine gives the worklist engine's
  timeline (forced onto the shared path, where no rank ever gets less than a core);
- with fewer, each event still got exactly its cost in core-seconds (checked with the
  measured side's independent sweep, `event_work`), ranks run in order, inputs arrive
  before they are used, and the step is no faster than with a core per rank and no
  faster than the total work spread over the cores.
"""

import dataclasses

import pytest
from _checks import assert_inputs_arrived
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.runtime.measured import event_work
from pipefold.schedule import build, names
from pipefold.simulate import CostModel, Link, simulate

EPS = 1e-9
times = st.floats(min_value=0.0, max_value=4.0, allow_nan=False, allow_infinity=False)


def _schedule(name, p, m, v):
    for num_virtual in (v, None):  # else the family's own v, so each run tests something
        try:
            return build(name, num_ranks=p, num_microbatches=m, num_virtual=num_virtual)
        except ScheduleError:
            continue
    return None


def _costs(schedule, data, num_cores):
    n = schedule.num_stages
    stage_times = st.lists(times, min_size=n, max_size=n)
    return CostModel.from_lists(
        data.draw(stage_times, label="f"),
        data.draw(stage_times, label="i"),
        data.draw(stage_times, label="w"),
        step=data.draw(stage_times, label="step"),
        link=Link(latency=data.draw(st.floats(0.0, 2.0), label="latency")),
        action_overhead=data.draw(st.floats(0.0, 0.5), label="action_overhead"),
        num_cores=num_cores,
    )


def _spans(timeline):
    return [[(e.action, e.step, e.start, e.end) for e in row] for row in timeline.events]


@pytest.mark.parametrize("name", names())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=st.integers(1, 6), m=st.integers(1, 16), v=st.integers(1, 3), data=st.data(),
       sync=st.booleans(), num_steps=st.integers(1, 2))
def test_a_core_per_rank_is_the_worklist_engine(name, p, m, v, data, sync, num_steps):
    schedule = _schedule(name, p, m, v)
    if schedule is None:
        return
    costs = _costs(schedule, data, num_cores=schedule.num_ranks)
    expected = simulate(schedule, costs, num_steps=num_steps, sync=sync)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CostModel, "shares_cores", lambda self, num_ranks: True)
        shared = simulate(schedule, costs, num_steps=num_steps, sync=sync)
    for got, want in zip(_spans(shared), _spans(expected), strict=True):
        assert [g[:2] for g in got] == [w[:2] for w in want]
        assert [t for g in got for t in g[2:]] == pytest.approx([t for w in want for t in w[2:]], abs=1e-9)
    def waits(timeline):  # waits of a picosecond are round-off, which the shared engine drops
        return [[(w.waiting_for, w.step) for w in row if w.end - w.start > 1e-9] for row in timeline.waits]

    assert waits(shared) == waits(expected)


@pytest.mark.parametrize("name", names())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=st.integers(2, 6), m=st.integers(1, 16), v=st.integers(1, 3), data=st.data(),
       sync=st.booleans(), num_steps=st.integers(1, 2))
def test_fewer_cores_than_ranks_share_them_fairly(name, p, m, v, data, sync, num_steps):
    schedule = _schedule(name, p, m, v)
    if schedule is None or schedule.num_ranks < 2:
        return
    num_cores = data.draw(st.integers(1, schedule.num_ranks - 1), label="num_cores")
    costs = _costs(schedule, data, num_cores)
    timeline = simulate(schedule, costs, num_steps=num_steps, sync=sync)
    alone_costs = dataclasses.replace(costs, num_cores=None)
    alone = simulate(schedule, alone_costs, num_steps=num_steps, sync=sync)

    for rank, row in enumerate(schedule.actions):
        events = timeline.events[rank]
        assert [e.action for e in events] == list(row) * num_steps
        for before, after in zip(events, events[1:], strict=False):
            assert after.start >= before.end - EPS
    # Every event got exactly its cost in core-seconds, as the measured side counts them.
    shared_clock = dataclasses.replace(timeline, meta={**timeline.meta, "clock": "shared"})
    for row, works in zip(timeline.events, event_work(shared_clock, num_cores), strict=True):
        assert works == pytest.approx([costs.time_of(e.action) for e in row], abs=1e-6)
    assert_inputs_arrived(timeline, schedule, costs)
    total_work = num_steps * sum(costs.time_of(a) for row in schedule.actions for a in row)
    assert timeline.makespan >= alone.makespan - 1e-6
    assert timeline.makespan >= total_work / num_cores - 1e-6


def _alarm(signum, frame):
    raise TimeoutError("the shared-core simulation did not finish")


# No shrinking: a hang found is reported at once instead of re-run while shrinking.
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(name=st.sampled_from(names()), data=st.data(), num_cores=st.sampled_from([1, 1.5, 2]))
def test_tiny_and_huge_costs_together_still_finish(name, data, num_cores):
    """Late in a long step an action's last picoseconds cannot move the clock (now + 1e-12 ==
    now); the engine must count them done instead of waiting for them forever."""
    import signal

    schedule = _schedule(name, 3, 6, 2)
    if schedule is None:
        return
    n = schedule.num_stages
    mixed = st.lists(st.one_of(st.floats(0.0, 1e-7), st.floats(1e4, 1e6)), min_size=n, max_size=n)
    costs = CostModel.from_lists(data.draw(mixed), data.draw(mixed), data.draw(mixed), num_cores=num_cores)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(5)
    try:
        timeline = simulate(schedule, costs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    total_work = sum(costs.time_of(a) for row in schedule.actions for a in row)
    assert timeline.makespan >= total_work / num_cores * (1 - 1e-9)


def test_actions_shorter_than_a_picosecond_still_take_their_time() -> None:
    # Found by hypothesis: with a round-off floor of 1e-12 s, every action below it finished as
    # soon as any progress was made, and 1f1b's 18 actions of 3 ranks on 2 cores ended in the
    # time of 3. Rank 0 alone runs stage 0's 6 F and 6 B, one after another.
    tiny = 7.224582208251515e-299
    schedule = build("1f1b", num_ranks=3, num_microbatches=6)
    costs = CostModel.from_lists([tiny, 0.0, 0.0], [tiny, 0.0, 0.0], [tiny, 0.0, 0.0], num_cores=2)
    timeline = simulate(schedule, costs)
    assert timeline.makespan >= (6 * tiny + 6 * 2 * tiny) * (1 - 1e-9)
