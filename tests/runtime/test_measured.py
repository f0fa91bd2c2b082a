"""measured_cost_model and measured_link on hand-made timelines (no ranks)."""

from __future__ import annotations

import pytest

from pipefold.errors import CostModelError
from pipefold.runtime.measured import measured_cost_model, measured_link
from pipefold.schedule import Action, Op, build
from pipefold.simulate import simulate
from pipefold.timeline import Event, Timeline, Wait


def test_measured_cost_model_take_each_op_per_stage():
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    events = (
        (Event(0, Action(Op.F, 0, 0), 0.0, 1.0), Event(0, Action(Op.F, 0, 1), 1.0, 4.0),
         Event(0, Action(Op.B, 0, 1), 6.0, 8.0), Event(0, Action(Op.B, 0, 0), 8.0, 12.0)),
        (Event(1, Action(Op.F, 1, 0), 1.0, 2.0), Event(1, Action(Op.F, 1, 1), 4.0, 5.0),
         Event(1, Action(Op.B, 1, 0), 5.0, 6.0), Event(1, Action(Op.B, 1, 1), 6.0, 7.0)),
    )
    timeline = Timeline(num_ranks=2, events=events, source="measured")
    costs = measured_cost_model([timeline], schedule)
    assert costs.f == (2.0, 1.0)
    assert costs.b == (3.0, 1.0)
    assert costs.i == (1.5, 0.5) and costs.w == (1.5, 0.5)
    # Over several steps each op takes its mean without stalls, so one stalled action does
    # not skew it. Stage 0 forwards took 1, 3, 1, 3, 100, 3: 100 is above 3 x the median (3),
    # the rest average 2.2 (the plain mean would be 18.5, the median 3).
    stalled = (Event(0, Action(Op.F, 0, 0), 0.0, 100.0), *events[0][1:])
    slow = Timeline(num_ranks=2, events=(stalled, events[1]), source="measured")
    assert measured_cost_model([timeline, timeline, slow], schedule).f == pytest.approx((2.2, 1.0))


def test_typical_duration_keeps_slow_actions_and_drops_stalls():
    """Actions systematically 30% slower (those after a wait) count; a 10x stall does not."""
    from pipefold.runtime.measured import typical_duration

    assert typical_duration([10.0] * 6 + [13.0] * 4) == pytest.approx(11.2)
    assert typical_duration([10.0] * 6 + [13.0] * 4 + [100.0]) == pytest.approx(11.2)
    with pytest.raises(CostModelError):
        typical_duration([])


def test_measured_cost_model_fill_each_stage_from_what_it_ran():
    """zb-h1 with its first stage fused: stage 0 ran B only, stage 1 ran I and W only."""
    schedule = build("zb-h1", num_ranks=2, num_microbatches=1)
    events = (
        (Event(0, Action(Op.F, 0, 0), 0.0, 1.0), Event(0, Action(Op.B, 0, 0), 5.0, 9.0)),
        (Event(1, Action(Op.F, 1, 0), 1.0, 2.0), Event(1, Action(Op.I, 1, 0), 2.0, 3.0),
         Event(1, Action(Op.W, 1, 0), 3.0, 5.0)),
    )
    costs = measured_cost_model([Timeline(num_ranks=2, events=events, source="measured")], schedule)
    assert costs.b == (4.0, 3.0)
    assert costs.i == (2.0, 1.0) and costs.w == (2.0, 2.0)

def _gpipe_two_by_two(clock: str | None) -> tuple[Timeline, object]:
    """gpipe, 2 ranks, 2 micro-batches; rank 1 waits for each forward message, rank 0 for each
    gradient, and every message lands 0.25 after its producer ends."""
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    events = (
        (Event(0, Action(Op.F, 0, 0), 0.0, 1.0), Event(0, Action(Op.F, 0, 1), 1.0, 2.0),
         Event(0, Action(Op.B, 0, 1), 4.25, 7.0), Event(0, Action(Op.B, 0, 0), 7.0, 9.0)),
        (Event(1, Action(Op.F, 1, 0), 1.25, 2.0), Event(1, Action(Op.F, 1, 1), 2.25, 3.0),
         Event(1, Action(Op.B, 1, 1), 3.0, 4.0), Event(1, Action(Op.B, 1, 0), 4.0, 5.0)),
    )
    waits = (
        # B0.1 waits from 2.0 for the gradient of B1.1, which ends at 4.0 and lands at 4.25.
        (Wait(0, Action(Op.B, 0, 1), 2.0, 4.25),),
        (Wait(1, Action(Op.F, 1, 0), 0.0, 1.25), Wait(1, Action(Op.F, 1, 1), 2.0, 2.25)),
    )
    meta = {} if clock is None else {"clock": clock}
    return Timeline(num_ranks=2, events=events, waits=waits, source="measured", meta=meta), schedule


def test_measured_link_is_the_median_latency_of_awaited_messages():
    timeline, schedule = _gpipe_two_by_two("shared")
    link = measured_link(timeline, schedule)
    assert link is not None and link.latency == pytest.approx(0.25)
    costs = measured_cost_model([timeline], schedule)
    assert costs.link.latency == pytest.approx(0.25)
    # The simulator then charges it on every cross-rank message.
    assert simulate(schedule, costs).makespan > simulate(schedule, measured_cost_model(
        [timeline], schedule, with_link=False)).makespan


def test_measured_link_needs_one_clock_and_a_blocked_consumer():
    per_rank, schedule = _gpipe_two_by_two("per-rank")
    assert measured_link(per_rank, schedule) is None
    unknown, _ = _gpipe_two_by_two(None)
    assert measured_link(unknown, schedule) is None
    assert measured_cost_model(unknown, schedule).link.latency == 0.0
    # A wait that began after its producer ended says nothing about the latency.
    shared, _ = _gpipe_two_by_two("shared")
    late = Timeline(num_ranks=2, events=shared.events, source="measured", meta={"clock": "shared"},
                    waits=((), (Wait(1, Action(Op.F, 1, 0), 1.1, 1.25),)))
    assert measured_link(late, schedule) is None


def test_measured_cost_model_refuses_a_mismatched_or_empty_input():
    timeline, _ = _gpipe_two_by_two("shared")
    with pytest.raises(CostModelError, match="timeline has 2 ranks but schedule 'gpipe' has 4"):
        measured_cost_model(timeline, build("gpipe", num_ranks=4, num_microbatches=2))
    with pytest.raises(CostModelError, match="no measured timeline given"):
        measured_cost_model([], build("gpipe", num_ranks=2, num_microbatches=2))


def test_overheads_from_gaps_and_step_times():
    """Gaps between a rank's actions count up to the next start or the start of its wait."""
    timeline, schedule = _gpipe_two_by_two("shared")
    # Rank 0: F0.0 -> F0.1 gap 0, F0.1 -> B0.1 waits from 2.0 (gap 0), B0.1 -> B0.0 gap 0.
    # Rank 1: F1.0 -> F1.1 waits from 2.0 (gap 0), then 0 and 0. Shift one event for a gap.
    rank1 = list(timeline.events[1])
    rank1[3] = Event(1, rank1[3].action, 4.5, 5.5)  # B1.0 starts 0.5 after B1.1 ends
    shifted = Timeline(
        num_ranks=2, events=(timeline.events[0], tuple(rank1)), waits=timeline.waits,
        source="measured", meta=timeline.meta,
    )
    costs = measured_cost_model([shifted], schedule, step_times=[9.75])
    assert costs.action_overhead == pytest.approx(0.5 / 6)
    assert costs.step_overhead == pytest.approx(9.75 - shifted.makespan)
    assert measured_cost_model([shifted], schedule).step_overhead == 0.0
    with pytest.raises(CostModelError, match="one wall time per timeline"):
        measured_cost_model([shifted], schedule, step_times=[1.0, 2.0])


def test_event_work_counts_each_events_share_of_the_cores():
    """Two ranks on one core: while both compute, each gets half of it."""
    from pipefold.runtime.measured import event_work

    events = (
        (Event(0, Action(Op.F, 0, 0), 0.0, 2.0), Event(0, Action(Op.F, 0, 1), 2.0, 6.0)),
        (Event(1, Action(Op.F, 1, 0), 2.0, 6.0),),
    )
    timeline = Timeline(num_ranks=2, events=events, source="measured", meta={"clock": "shared"})
    assert event_work(timeline, 1) == [[2.0, 2.0], [2.0]]
    assert event_work(timeline, 2) == [[2.0, 4.0], [4.0]]  # a core each: the durations
    assert event_work(timeline, None) == [[2.0, 4.0], [4.0]]
    # Without one clock the overlap is unknown, so durations stand.
    per_rank = Timeline(num_ranks=2, events=events, source="measured", meta={"clock": "per-rank"})
    assert event_work(per_rank, 1) == [[2.0, 4.0], [4.0]]


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "dualpipe-v"])
def test_a_shared_core_run_measures_back_to_its_costs(name):
    """Simulate 4 ranks on 2 cores, read the timeline back as a measurement: the costs (and
    `num_cores`, from the meta as `Pipeline` records it) come back, and replaying them
    gives the same step; ignoring the sharing mistakes the slowdown for work."""
    from pipefold.simulate import CostModel, Link, predicted_step_time

    schedule = build(name, num_ranks=4, num_microbatches=8)
    n = schedule.num_stages
    costs = CostModel.from_lists(
        [1.0 + 0.1 * s for s in range(n)], [1.5] * n, [0.5] * n, link=Link(latency=0.05), num_cores=2
    )
    simulated = simulate(schedule, costs)
    measured = Timeline(
        num_ranks=4, events=simulated.events, waits=simulated.waits, source="measured",
        meta={"clock": "shared", "num_cores": 2},
    )
    back = measured_cost_model([measured], schedule)
    assert back.num_cores == 2
    assert back.f == pytest.approx(costs.f)
    assert back.b == pytest.approx(costs.b)
    assert predicted_step_time(schedule, back) == pytest.approx(simulated.makespan, rel=0.02)
    naive = measured_cost_model([measured], schedule, num_cores=None)
    assert naive.num_cores is None and max(naive.f) > max(costs.f) * 1.2
