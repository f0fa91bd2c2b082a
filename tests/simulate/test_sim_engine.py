"""The event engine on hand-built schedules: blocking semantics, links, waits, steps, memory."""

import pytest

from pipefold.errors import ConfigError, CostModelError, ScheduleError
from pipefold.schedule import Action, Schedule, WeightUpdate, build
from pipefold.simulate import CostModel, Link, simulate
from pipefold.timeline import Timeline


def act(text):
    return Action.parse(text)


def two_rank(rows, microbatches=1, placement=(0, 1), weight_update=WeightUpdate.FLUSH, stages=2):
    rows = tuple(tuple(act(text) for text in row.split()) for row in rows)
    return Schedule("hand", 2, stages, microbatches, placement, rows, weight_update)


def spans(timeline, rank):
    return [(str(e.action), e.start, e.end) for e in timeline.events[rank]]


def test_two_stages_one_microbatch_runs_in_dependency_order():
    schedule = two_rank(["F0.0 B0.0", "F1.0 B1.0"])
    timeline = simulate(schedule, CostModel.uniform(2, f=1, i=1, w=1))
    assert spans(timeline, 0) == [("F0.0", 0, 1), ("B0.0", 4, 6)]
    assert spans(timeline, 1) == [("F1.0", 1, 2), ("B1.0", 2, 4)]
    assert timeline.makespan == 6
    assert [(str(w.waiting_for), w.start, w.end) for w in timeline.waits[0]] == [("B0.0", 1, 4)]
    assert [(str(w.waiting_for), w.start, w.end) for w in timeline.waits[1]] == [("F1.0", 0, 1)]


def test_cross_rank_input_pays_the_link_and_same_rank_does_not():
    # Stage 0 and 1 on rank 0, stage 2 on rank 1: only the 1 -> 2 boundary is a message.
    rows = ("F0.0 F1.0 B1.0 B0.0", "F2.0 B2.0")
    schedule = two_rank(rows, placement=(0, 0, 1), stages=3)
    costs = CostModel.uniform(3, f=1, i=1, w=1, message_bytes=100, link=Link(latency=0.5, bandwidth=200))
    timeline = simulate(schedule, costs)
    assert spans(timeline, 0)[:2] == [("F0.0", 0, 1), ("F1.0", 1, 2)]
    assert spans(timeline, 1) == [("F2.0", 3, 4), ("B2.0", 4, 6)]  # 2 + 0.5 + 100/200
    assert spans(timeline, 0)[2:] == [("B1.0", 7, 9), ("B0.0", 9, 11)]


def test_sends_do_not_block_the_sender():
    # Rank 0 runs F0.1 right after F0.0 even though F0.0's message takes a long time.
    schedule = two_rank(["F0.0 F0.1 B0.0 B0.1", "F1.0 F1.1 B1.0 B1.1"], microbatches=2)
    costs = CostModel.uniform(2, message_bytes=1, link=Link(latency=10))
    timeline = simulate(schedule, costs)
    assert spans(timeline, 0)[:2] == [("F0.0", 0, 1), ("F0.1", 1, 2)]
    assert spans(timeline, 1)[0] == ("F1.0", 11, 12)


def test_split_backward_i_then_w():
    schedule = two_rank(["F0.0 I0.0 W0.0", "F1.0 I1.0 W1.0"])
    timeline = simulate(schedule, CostModel.uniform(2, f=1, i=2, w=3))
    assert spans(timeline, 1) == [("F1.0", 1, 2), ("I1.0", 2, 4), ("W1.0", 4, 7)]
    assert spans(timeline, 0) == [("F0.0", 0, 1), ("I0.0", 4, 6), ("W0.0", 6, 9)]


def test_deadlocked_schedule_raises_schedule_error_pointing_at_the_cell():
    # Rank 1 puts B1.0 before the F1.0 it consumes, so it never starts, nor does rank 0's B0.0.
    schedule = two_rank(["F0.0 F0.1 B0.0 B0.1", "B1.0 F1.0 F1.1 B1.1"], microbatches=2)
    with pytest.raises(ScheduleError, match=r"deadlocked at rank 0, B0.0 \(stuck ranks: \[0, 1\]\)"):
        simulate(schedule, CostModel.uniform(2))


def test_wrong_stage_count_and_bad_num_steps_are_refused():
    schedule = two_rank(["F0.0 B0.0", "F1.0 B1.0"])
    with pytest.raises(CostModelError, match="num_stages=3"):
        simulate(schedule, CostModel.uniform(3))
    with pytest.raises(ConfigError, match="num_steps = 0"):
        simulate(schedule, CostModel.uniform(2), num_steps=0)


def test_sync_steps_are_separated_by_a_barrier():
    schedule = two_rank(["F0.0 B0.0", "F1.0 B1.0"])
    timeline = simulate(schedule, CostModel.uniform(2), num_steps=3, sync=True)
    assert timeline.num_steps == 3
    assert timeline.makespan == 18
    assert [e.step for e in timeline.events[0]] == [0, 0, 1, 1, 2, 2]
    second = timeline.step_events(1)
    assert second[1][0].start == 7  # barrier at 6, then F0.0 of step 1 (6..7) feeds F1.0
    # Rank 1 idles from its step-0 end (4) to the barrier + F0.0 (7): a recorded wait.
    assert any(w.step == 1 and (w.start, w.end) == (4, 7) for w in timeline.waits[1])


def test_async_steps_overlap_across_ranks():
    # Rank 1 finishes step 0 at 4; without a barrier rank 0 starts step 1 at 6 (its own end).
    schedule = two_rank(["F0.0 B0.0", "F1.0 B1.0"])
    sync = simulate(schedule, CostModel.uniform(2), num_steps=4, sync=True)
    free = simulate(schedule, CostModel.uniform(2), num_steps=4, sync=False)
    assert free.makespan <= sync.makespan
    assert free.busy_time(0) == sync.busy_time(0) == 4 * 3


def test_activation_bytes_follow_f_to_backward_and_i_to_w():
    schedule = two_rank(["F0.0 F0.1 I0.0 I0.1 W0.0 W0.1", "F1.0 I1.0 F1.1 I1.1 W1.0 W1.1"], microbatches=2)
    costs = CostModel.from_lists(
        [1, 1], [1, 1], [1, 1], activation_bytes=[100, 100], weight_grad_bytes=[10, 10]
    )
    timeline = simulate(schedule, costs)
    # Rank 0 holds both micro-batches' activations (200); rank 1 at most one plus one W buffer.
    assert timeline.activation_bytes_peak == (200, 110)
    assert timeline.peak_activations(0) == 2
    assert timeline.peak_activations(1) == 1


def test_stash_holds_the_versions_in_flight_micro_batches_saw():
    # One rank, one stage: both forwards see version 0; the STEP after B0.0 makes version 1,
    # but B0.1 still needs version 0, so two versions live until B0.1 ends.
    rows = (tuple(act(t) for t in "F0.0 F0.1 B0.0 STEP0.0 B0.1 STEP0.1".split()),)
    schedule = Schedule("stash", 1, 1, 2, (0,), rows, WeightUpdate.STASH)
    costs = CostModel.uniform(1, weight_bytes=1000, step=0.5)
    timeline = simulate(schedule, costs)
    assert timeline.weight_versions_peak == (2,)
    assert timeline.weight_bytes_peak == (2000,)
    assert timeline.busy_time(0) == 1 + 1 + 2 + 0.5 + 2 + 0.5


def test_flush_holds_one_version_of_each_owned_stage():
    schedule = two_rank(["F0.0 F1.0 B1.0 B0.0", ""], placement=(0, 0), stages=2)
    timeline = simulate(schedule, CostModel.uniform(2, weight_bytes=7))
    assert timeline.weight_versions_peak == (1, 0)
    assert timeline.weight_bytes_peak == (14, 0)


def test_timeline_json_round_trip_keeps_steps_and_memory():
    schedule = two_rank(["F0.0 B0.0", "F1.0 B1.0"])
    timeline = simulate(schedule, CostModel.uniform(2, activation_bytes=3), num_steps=2)
    again = Timeline.from_json(timeline.to_json())
    assert again.events == timeline.events
    assert again.waits == timeline.waits
    assert again.activation_bytes_peak == timeline.activation_bytes_peak == (3, 3)
    assert again.weight_bytes_peak == timeline.weight_bytes_peak
    assert again.num_steps == 2


def test_missing_producer_is_a_schedule_error():
    schedule = two_rank(["F0.0 B0.0", "B1.0"])
    with pytest.raises(ScheduleError, match="B1.0 needs F1.0, which no rank runs"):
        simulate(schedule, CostModel.uniform(2))


# -- runtime overheads (docs/decisions.md, "Runtime overheads") ------------------------------


def test_action_overhead_separates_a_ranks_actions_but_not_its_first():
    schedule = two_rank(["F0.0 B0.0", "F1.0 B1.0"])
    costs = CostModel.uniform(2, f=1, i=1, w=1, action_overhead=0.25)
    timeline = simulate(schedule, costs)
    # Rank 1 waits for F0.0's output anyway, so its first action starts with the message;
    # B1.0 follows F1.0 after the overhead; rank 0 waits for B1.0, so no extra gap there.
    assert spans(timeline, 0) == [("F0.0", 0, 1), ("B0.0", 4.25, 6.25)]
    assert spans(timeline, 1) == [("F1.0", 1, 2), ("B1.0", 2.25, 4.25)]
    assert [(str(w.waiting_for), w.start, w.end) for w in timeline.waits[0]] == [("B0.0", 1.25, 4.25)]


def test_action_overhead_adds_up_on_one_rank():
    schedule = Schedule(
        "hand", 1, 1, 2, (0,), (tuple(act(t) for t in "F0.0 F0.1 B0.1 B0.0".split()),), WeightUpdate.FLUSH
    )
    base = simulate(schedule, CostModel.uniform(1, f=1, i=1, w=1)).makespan
    loaded = simulate(schedule, CostModel.uniform(1, f=1, i=1, w=1, action_overhead=0.5)).makespan
    assert loaded == base + 3 * 0.5


def test_step_overhead_sits_between_synchronous_steps_and_in_the_step_time():
    from pipefold.simulate import predicted_step_time

    schedule = two_rank(["F0.0 B0.0", "F1.0 B1.0"])
    costs = CostModel.uniform(2, f=1, i=1, w=1, step_overhead=0.5)
    one = simulate(schedule, costs)
    assert one.makespan == 6  # the events of one step do not cover the time outside them
    assert predicted_step_time(schedule, costs) == 6.5
    two = simulate(schedule, costs, num_steps=2)
    assert two.makespan == 2 * 6 + 0.5
    steady = simulate(schedule, costs, num_steps=2, sync=False)
    assert steady.makespan <= 2 * 6


def test_ranks_computing_at_once_share_the_cores():
    """Shared cores (docs/decisions.md): gpipe, 2 ranks, 2 micro-batches, f=1, b=2, on 1 core. F0.1 and
    F1.0 overlap from t=1 and each gets half the core, so both end at 3 instead of 2."""
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    timeline = simulate(schedule, CostModel.uniform(2, f=1, i=1, w=1, num_cores=1))
    assert spans(timeline, 0)[:2] == [("F0.0", 0, 1), ("F0.1", 1, 3)]
    assert spans(timeline, 1)[:2] == [("F1.0", 1, 3), ("F1.1", 3, 4)]
    # F1.1 and B1.0 run alone (rank 0 waits for a gradient): 3-4, 4-6. From 6, B1.1 and
    # B0.0 (which needed B1.0) share the core: 2 s of work each end at 10; B0.1 alone 10-12.
    assert spans(timeline, 1)[2:] == [("B1.0", 4, 6), ("B1.1", 6, 10)]
    assert spans(timeline, 0)[2:] == [("B0.0", 6, 10), ("B0.1", 10, 12)]
    # The one core never idled: the makespan is the total work, 4 x 1 + 4 x 2.
    assert timeline.makespan == 12
    assert [(str(w.waiting_for), w.start, w.end) for w in timeline.waits[0]] == [("B0.0", 3, 6)]
    # With a core per rank it is the textbook schedule again.
    alone = simulate(schedule, CostModel.uniform(2, f=1, i=1, w=1, num_cores=2))
    assert alone.events == simulate(schedule, CostModel.uniform(2, f=1, i=1, w=1)).events
