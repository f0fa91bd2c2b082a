"""CostModel: defaults, validation that names the field, links, JSON round trip."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import CostModelError
from pipefold.schedule import Action, build
from pipefold.simulate import CostModel, Link


def test_uniform_defaults_b_to_i_plus_w_and_sizes_to_zero():
    costs = CostModel.uniform(3, f=1.0, i=2.0, w=0.5)
    assert costs.b == (2.5, 2.5, 2.5)
    assert costs.step == (0.0, 0.0, 0.0)
    assert costs.activation_bytes == (0, 0, 0)
    assert costs.message_bytes == (0, 0)


def test_from_lists_keeps_per_stage_values():
    costs = CostModel.from_lists([1, 2], [3, 4], [5, 6], b=[7, 8], activation_bytes=[10, 20])
    assert costs.num_stages == 2
    assert costs.time_of(Action.parse("F1.0")) == 2.0
    assert costs.time_of(Action.parse("I0.3")) == 3.0
    assert costs.time_of(Action.parse("W1.3")) == 6.0
    assert costs.time_of(Action.parse("B1.0")) == 8.0
    assert costs.activation_bytes == (10, 20)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"b": [1.0]}, r"b has 1 entries but num_stages is 2"),
        ({"activation_bytes": [1, 2, 3]}, r"activation_bytes has 3 entries but needs 2"),
        ({"message_bytes": [1, 2]}, r"message_bytes has 2 entries but needs 1: one per stage boundary"),
        ({"weight_bytes": [1, -5]}, r"weight_bytes\[1\] = -5"),
        ({"step": [0.0, math.nan]}, r"step\[1\] = nan"),
    ],
)
def test_bad_lists_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(CostModelError, match=match):
        CostModel.from_lists([1, 1], [1, 1], [1, 1], **kwargs)


def test_negative_time_is_refused():
    with pytest.raises(CostModelError, match=r"f\[0\] = -1.0; times must be finite and >= 0"):
        CostModel.from_lists([-1], [1], [1])


def test_zero_stages_is_refused():
    with pytest.raises(CostModelError, match="num_stages = 0"):
        CostModel.uniform(0)


def test_bad_link_is_refused():
    with pytest.raises(CostModelError, match="bandwidth = 0"):
        Link(latency=0.1, bandwidth=0)
    with pytest.raises(CostModelError, match="latency = -1"):
        Link(latency=-1)


def test_transfer_time_is_latency_plus_bytes_over_bandwidth_and_free_on_one_rank():
    costs = CostModel.uniform(3, message_bytes=1000, link=Link(latency=0.5, bandwidth=100.0))
    assert costs.transfer_time(0, 0, 1) == pytest.approx(10.5)
    assert costs.transfer_time(1, 2, 2) == 0.0


def test_link_override_applies_to_both_directions():
    slow = Link(latency=1.0, bandwidth=10.0)
    costs = CostModel.from_lists(
        [1, 1, 1], [1, 1, 1], [1, 1, 1], message_bytes=[10, 20], link_overrides={(1, 2): slow}
    )
    assert costs.transfer_time(1, 1, 2) == pytest.approx(3.0)
    assert costs.transfer_time(1, 2, 1) == pytest.approx(3.0)
    assert costs.transfer_time(0, 0, 1) == 0.0  # default link is ideal


def test_check_schedule_names_both_counts_and_the_fix():
    schedule = build("gpipe", num_ranks=4, num_microbatches=2)
    CostModel.uniform(4).check_schedule(schedule)
    with pytest.raises(CostModelError, match=r"num_stages=3 but schedule 'gpipe' has 4 stages.*uniform\(4"):
        CostModel.uniform(3).check_schedule(schedule)


def test_check_schedule_refuses_overrides_for_missing_ranks():
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    costs = CostModel.from_lists([1, 1], [1, 1], [1, 1], link_overrides={(0, 5): Link()})
    with pytest.raises(CostModelError, match=r"pair \(0, 5\)"):
        costs.check_schedule(schedule)


def test_json_round_trip_dict_and_file(tmp_path):
    costs = CostModel.from_lists(
        [1.0, 2.0],
        [0.5, 0.25],
        [0.5, 0.75],
        step=[0.1, 0.2],
        activation_bytes=[100, 200],
        weight_grad_bytes=[10, 20],
        weight_bytes=[1000, 2000],
        message_bytes=[64],
        link=Link(latency=1e-5),
        link_overrides={(0, 1): Link(latency=1e-3, bandwidth=1e9)},
    )
    data = costs.to_json()
    assert data["link"] == {"latency": 1e-5, "bandwidth": None}  # infinite bandwidth
    assert CostModel.from_json(data) == costs
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    assert CostModel.from_json(path) == costs
    assert CostModel.from_json(str(path)) == costs


def test_json_with_unknown_or_missing_fields_is_refused(tmp_path):
    with pytest.raises(CostModelError, match=r"unknown cost model field\(s\) \['forward'\]"):
        CostModel.from_json({"f": [1], "i": [1], "w": [1], "forward": [1]})
    with pytest.raises(CostModelError, match="lacks 'w'"):
        CostModel.from_json({"f": [1], "i": [1]})
    with pytest.raises(CostModelError, match="num_stages = 3 but f has 1"):
        CostModel.from_json({"num_stages": 3, "f": [1], "i": [1], "w": [1]})
    with pytest.raises(CostModelError, match="cannot read cost model JSON"):
        CostModel.from_json(tmp_path / "missing.json")


def test_cost_models_hash_so_a_planner_can_cache_by_them():
    a = CostModel.from_lists([1, 1], [1, 1], [1, 1], link_overrides={(0, 1): Link(latency=1.0)})
    b = CostModel.from_lists([1, 1], [1, 1], [1, 1], link_overrides={(0, 1): Link(latency=1.0)})
    assert a == b and hash(a) == hash(b)
    assert len({a, b, CostModel.uniform(2)}) == 2


@settings(max_examples=40, deadline=None)
@given(
    num_stages=st.integers(1, 6),
    data=st.data(),
    bandwidth=st.one_of(st.just(math.inf), st.floats(1.0, 1e12)),
)
def test_json_round_trip_property(num_stages, data, bandwidth):
    times = st.lists(st.floats(0.0, 10.0), min_size=num_stages, max_size=num_stages)
    sizes = st.lists(st.integers(0, 2**40), min_size=num_stages, max_size=num_stages)
    costs = CostModel.from_lists(
        data.draw(times),
        data.draw(times),
        data.draw(times),
        b=data.draw(times),
        activation_bytes=data.draw(sizes),
        weight_bytes=data.draw(sizes),
        message_bytes=data.draw(sizes)[1:],
        link=Link(latency=data.draw(st.floats(0.0, 1.0)), bandwidth=bandwidth),
    )
    assert CostModel.from_json(json.loads(json.dumps(costs.to_json()))) == costs


def test_overheads_are_validated_and_round_trip():
    costs = CostModel.uniform(2, action_overhead=1e-4, step_overhead=2e-3)
    assert CostModel.from_json(costs.to_json()) == costs
    assert CostModel.from_json({"f": [1], "i": [1], "w": [1]}).action_overhead == 0.0
    for name in ("action_overhead", "step_overhead"):
        with pytest.raises(CostModelError, match=name):
            CostModel.uniform(2, **{name: -1.0})
        with pytest.raises(CostModelError, match=name):
            CostModel.uniform(2, **{name: float("nan")})


def test_num_cores_is_validated_and_round_trips():
    costs = CostModel.uniform(2, num_cores=1)
    assert CostModel.from_json(json.loads(json.dumps(costs.to_json()))) == costs
    assert CostModel.from_json({"f": [1], "i": [1], "w": [1]}).num_cores is None
    assert costs.shares_cores(2) and not costs.shares_cores(1)
    assert not CostModel.uniform(2).shares_cores(64)
    assert CostModel.uniform(2, num_cores=1.5).num_cores == 1.5  # a replica's share of the cores
    for bad in (0, -1, float("inf"), float("nan"), True, "2"):
        with pytest.raises(CostModelError, match=r"num_cores = .*cores / threads per rank"):
            CostModel.uniform(2, num_cores=bad)
