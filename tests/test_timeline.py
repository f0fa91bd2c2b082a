"""Timeline metrics and serialization, independent of the simulator."""

import pytest

from pipefold.schedule import Action
from pipefold.timeline import Event, Timeline, Wait


def ev(rank, text, start, end, step=0):
    return Event(rank, Action.parse(text), start, end, step)


def two_rank_timeline():
    return Timeline(
        num_ranks=2,
        events=(
            (ev(0, "F0.0", 0, 1), ev(0, "F0.1", 1, 2), ev(0, "B0.0", 4, 6), ev(0, "B0.1", 6, 8)),
            (ev(1, "F1.0", 1, 2), ev(1, "B1.0", 2, 4), ev(1, "F1.1", 4, 5), ev(1, "B1.1", 5, 7)),
        ),
        waits=((Wait(0, Action.parse("B0.0"), 2, 4),), (Wait(1, Action.parse("F1.0"), 0, 1),)),
    )


def test_runtime_style_constructor_and_positional_event_still_work():
    event = Event(0, Action.parse("F0.0"), 0.0, 1.0)
    assert event.step == 0 and event.duration == 1.0
    timeline = Timeline(
        num_ranks=1,
        events=((event,),),
        waits=((),),
        activation_bytes_peak=(10,),
        weight_versions_peak=(1,),
        source="measured",
        schedule_name="gpipe",
        meta={"host": "x"},
    )
    assert timeline.weight_bytes_peak == ()
    assert timeline.summary()["source"] == "measured"


def test_metrics():
    timeline = two_rank_timeline()
    assert timeline.makespan == 8
    assert timeline.busy_time(0) == 6 and timeline.busy_time(1) == 6
    assert timeline.bubble_fraction == pytest.approx(1 - 12 / 16)
    assert timeline.wait_time(0) == 2
    assert timeline.peak_activations(0) == 2
    # Rank 1 ends B1.0 before it runs F1.1, so it never holds two.
    assert timeline.peak_activations(1) == 1
    assert timeline.num_steps == 1
    assert timeline.steady_state_bubble() == timeline.bubble_fraction


def test_steady_state_bubble_uses_the_last_step_period():
    # Step 0 runs 0..2 on both ranks with rank 1 idle half the time; step 1 runs 2..4 fully busy.
    timeline = Timeline(
        num_ranks=2,
        events=(
            (ev(0, "F0.0", 0, 2), ev(0, "F0.0", 2, 4, step=1)),
            (ev(1, "F1.0", 1, 2), ev(1, "F1.0", 2, 4, step=1)),
        ),
    )
    assert timeline.num_steps == 2
    assert timeline.bubble_fraction == pytest.approx(1 - 7 / 8)
    assert timeline.steady_state_bubble() == pytest.approx(0.0)
    assert [len(row) for row in timeline.step_events(1)] == [1, 1]


def test_json_round_trip_and_old_three_entry_events():
    timeline = two_rank_timeline()
    assert Timeline.from_json(timeline.to_json()) == timeline
    old = timeline.to_json()
    old["events"] = [[entry[:3] for entry in row] for row in old["events"]]
    old["waits"] = [[entry[:3] for entry in row] for row in old["waits"]]
    assert Timeline.from_json(old).events == timeline.events


def test_summary_is_plain_data():
    summary = two_rank_timeline().summary()
    assert summary["makespan"] == 8
    assert summary["peak_activations"] == [2, 1]
    assert summary["num_steps"] == 1
