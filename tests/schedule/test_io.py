"""JSON and torch-CSV round-trips for every family, and the errors of the readers."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.files import write_atomic
from pipefold.schedule import Action, Op, WeightUpdate, build, family, names
from pipefold.schedule.io import dumps, from_json, from_torch_csv, load, to_json, to_torch_csv

ASYNC = {"pipedream", "pipedream-2bw"}


def small(name, num_ranks=3, num_microbatches=5):
    return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches)


@pytest.mark.parametrize("name", names())
def test_json_round_trip(name):
    schedule = small(name)
    data = to_json(schedule)
    # Through real JSON text, not just the dict, so nothing relies on Python types.
    assert from_json(json.loads(json.dumps(data))) == schedule


@pytest.mark.parametrize("name", names())
def test_dumps_load_round_trip(name, tmp_path):
    schedule = small(name)
    path = write_atomic(tmp_path / "schedule.json", dumps(schedule))
    assert load(path) == schedule


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(names()), num_ranks=st.integers(1, 6), num_microbatches=st.integers(1, 12))
def test_round_trips_property(name, num_ranks, num_microbatches):
    schedule = small(name, num_ranks, num_microbatches)
    assert from_json(to_json(schedule)) == schedule
    if name in ASYNC:
        return
    back = from_torch_csv(to_torch_csv(schedule), name=schedule.name)
    assert back == schedule


@pytest.mark.parametrize("name", [n for n in names() if n not in ASYNC])
def test_torch_csv_round_trip(name):
    schedule = small(name)
    text = to_torch_csv(schedule)
    rows = text.splitlines()
    assert len(rows) == schedule.num_ranks
    assert rows[0].split(",")[0] == f"{schedule.actions[0][0].stage}F0"
    back = from_torch_csv(text)
    assert back.actions == schedule.actions
    assert back.placement == schedule.placement
    assert back.num_microbatches == schedule.num_microbatches
    assert back.weight_update is WeightUpdate.FLUSH


def test_torch_csv_cell_format():
    schedule = build("zb-h1", num_ranks=2, num_microbatches=2)
    assert to_torch_csv(schedule) == "0F0,0F1,0I0,0W0,0I1,0W1\n1F0,1I0,1F1,1I1,1W0,1W1\n"


@pytest.mark.parametrize("name", sorted(ASYNC))
def test_asynchronous_schedules_are_refused_by_the_csv_bridge(name):
    with pytest.raises(ScheduleError, match="weight_update.*to_json"):
        to_torch_csv(small(name))


def test_csv_empty_cells_are_idle_and_overlaps_are_expanded():
    # Both stages on rank 0, so the overlapped pair (torch's DualPipeV cell) stays on one row.
    schedule = from_torch_csv("0F0,,1F0,(0F1;1B0)OVERLAP_F_B,1F1,,1B1,0B0,0B1\n")
    assert schedule.placement == (0, 0)
    assert [str(a) for a in schedule.actions[0]] == [
        "F0.0", "F1.0", "F0.1", "B1.0", "F1.1", "B1.1", "B0.0", "B0.1"
    ]


def test_csv_placement_is_inferred_from_rows():
    schedule = from_torch_csv("0F0,0F1,3F0,3B0,0I0,0W0,3F1,3B1,0I1,0W1\n1F0,2F0,1F1,2F1,2B0,1B0,2B1,1B1\n")
    assert schedule.placement == (0, 1, 1, 0)


def test_csv_extra_ranks_and_too_few_ranks():
    text = to_torch_csv(build("1f1b", num_ranks=2, num_microbatches=2))
    with pytest.raises(ScheduleError, match="num_ranks=1"):
        from_torch_csv(text, num_ranks=1)
    padded = from_torch_csv(text, num_ranks=3)
    assert padded.num_ranks == 3 and padded.actions[2] == () and padded.placement == (0, 1)


@pytest.mark.parametrize(
    "text,match",
    [
        ("0F0,0SEND_F0\n", "column 1.*compute_comms"),
        ("0F0,0B0\n0F1\n", "stage 0 appears on rank 0 and rank 1"),
        ("1F0,1B0\n", r"stages \[0\] have no actions"),
        ("\n", "no compute actions"),
        ("0F0,1F0\n1B0,0B0\n", "stage 1 appears on rank 0 and rank 1"),
    ],
)
def test_csv_errors_name_the_problem(text, match):
    with pytest.raises(ScheduleError, match=match):
        from_torch_csv(text)


def test_csv_invalid_order_is_refused_by_validate():
    with pytest.raises(ScheduleError, match="deadlock"):
        from_torch_csv("0F0,0B0\n1B0,1F0\n")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"format": "something"}, "not a pipefold schedule"),
        ({"version": 99}, "version"),
        ({"num_ranks": "3"}, "'num_ranks' must be int"),
        ({"num_ranks": True}, "'num_ranks' must be int"),
        ({"weight_update": "sometimes"}, "weight_update.*flush"),
        ({"placement": [0, "1", 2]}, "placement"),
        ({"actions": [["F0.0"], "F1.0", []]}, r"'actions'\[1\]"),
    ],
)
def test_json_errors_name_the_field(change, match):
    data = to_json(build("gpipe", num_ranks=3, num_microbatches=2))
    data.update(change)
    with pytest.raises(ScheduleError, match=match):
        from_json(data)


def test_json_missing_field_is_named():
    data = to_json(build("gpipe", num_ranks=2, num_microbatches=2))
    del data["placement"]
    with pytest.raises(ScheduleError, match="no 'placement' field"):
        from_json(data)


def test_json_check_can_be_skipped_for_inspection():
    data = to_json(build("gpipe", num_ranks=2, num_microbatches=2))
    data["actions"][1] = ["B1.0", "F1.0", "F1.1", "B1.1"]
    with pytest.raises(ScheduleError, match="deadlock"):
        from_json(data)
    broken = from_json(data, check=False)
    assert broken.actions[1][0] == Action(Op.B, 1, 0)


def test_load_refuses_non_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("rank 0: F0.0")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        load(path)
    path.write_text("[1, 2]")
    with pytest.raises(ScheduleError, match="JSON object"):
        load(path)


def test_families_export_their_default_virtual():
    for name in names():
        assert to_json(small(name))["num_stages"] == 3 * family(name).default_virtual
