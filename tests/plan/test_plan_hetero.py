"""A mix of device kinds in a hardware file: per-rank speed and memory in the plan (one process)."""

import json

import pytest

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.plan import ModelCosts, PlanOptions, plan
from pipefold.plan.costs import LayerCost
from pipefold.plan.errors import NoFeasiblePlan
from pipefold.plan.hardware import hardware_from_mapping
from pipefold.plan.search import evaluate
from pipefold.plan.space import Config
from pipefold.plan.topology import place
from pipefold.simulate import Link

MiB = 2**20

FAST = {"name": "fast", "count": 2, "speed": 1.0, "memory": "16GiB"}
SLOW = {"name": "slow", "count": 2, "speed": 0.5, "memory": "16GiB"}


def _data(groups, per_node=2):
    return {
        "name": "mix", "devices_per_node": per_node,
        "compute": {"default_dtype": "fp32", "memory_bandwidth": 1e12, "peak_flops": {"fp32": 1e12},
                    "matmul": {"max_efficiency": 1.0, "half_flops": 1.0}},
        "memory": {"bytes": "16GiB", "reserve": "1GiB"},
        "links": {"intra_node": {"bandwidth": 1e11, "latency": 0.0},
                  "inter_node": {"bandwidth": 1e11, "latency": 0.0}},
        "device_groups": groups,
    }


def _mix(*groups, per_node=2):
    return hardware_from_mapping(_data(list(groups), per_node), "mix.toml")


def _costs(activation_bytes=MiB):
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=activation_bytes, output_bytes=1024,
                      parameter_bytes=MiB)
    return ModelCosts(layers=(layer,) * 12, reference_rows=1)


def _plan(hardware, costs=None, **pins):
    options = dict(num_ranks=4, global_batch=8, hardware=hardware, schedules=("1f1b",), virtual=1,
                   order_search_s=0)
    options.update(pins)
    return plan(costs or _costs(), PlanOptions(**options))


def _layers_per_rank(candidate):
    return [candidate.num_layers_of(rank) for rank in range(candidate.num_ranks)]


def test_slower_ranks_get_fewer_layers_and_the_step_is_priced_at_their_speed():
    alike = _plan(_mix(FAST, dict(SLOW, speed=1.0)))
    assert alike.choice.rank_speeds == ()  # alike devices: the plan is the plain one
    assert _layers_per_rank(alike.choice) == [3, 3, 3, 3]
    # One kind at half the reference's speed: every stage takes twice as long.
    halved = _plan(_mix(dict(SLOW, count=4))).choice
    assert halved.rank_speeds == (0.5,) * 4 and _layers_per_rank(halved) == [3, 3, 3, 3]
    assert halved.step_time == pytest.approx(2 * alike.choice.step_time)
    mixed = _plan(_mix(FAST, SLOW)).choice
    assert mixed.rank_speeds == (1.0, 1.0, 0.5, 0.5)
    # Half-speed ranks take half the layers: every stage then takes 4 x 3 s per micro-batch.
    assert _layers_per_rank(mixed) == [4, 4, 2, 2]
    # 1F1B, 8 micro-batches, 4 equal stages of 12 s (F 4 + B 8): (8 + 3) x 12 s.
    assert mixed.step_time == pytest.approx(11 * 12.0)
    # The even partition the devices would get if alike is slower on this mix: the slow ranks'
    # 3 layers take 18 s per micro-batch.
    even = evaluate(_costs(), Config("1f1b", 1, 8, 1), 4, (0, 3, 6, 9, 12), (), Link(),
                    rank_speeds=mixed.rank_speeds)
    assert even.step_time > 1.3 * mixed.step_time
    # The slow kind first: the slow ranks are now 0 and 1.
    reversed_mix = _plan(_mix(SLOW, FAST)).choice
    assert reversed_mix.rank_speeds == (0.5, 0.5, 1.0, 1.0)
    assert _layers_per_rank(reversed_mix) == [2, 2, 4, 4]


def test_peak_flops_gives_the_speed_and_a_tp_group_runs_at_its_slowest_device():
    mix = _mix(FAST, {"name": "slow", "count": 2, "peak_flops": 2.5e11, "memory": "16GiB"})
    assert [group.speed for group in mix.device_groups] == [1.0, 0.25]
    # tp=2 on nodes of 2: each tp group is one node, one kind; pp=2.
    links = place(mix, num_data_parallel=1, num_ranks=2, num_tensor_parallel=2)
    assert links.rank_speeds == (1.0, 0.25)
    # tp=4 on nodes of 2: each pipeline rank's tp group spans both kinds.
    wide = _mix(dict(FAST, count=4), dict(SLOW, count=4), per_node=2)
    links = place(wide, num_data_parallel=1, num_ranks=2, num_tensor_parallel=4)
    assert links.rank_speeds == (1.0, 0.5)
    links = place(wide, num_data_parallel=4, num_ranks=2, num_tensor_parallel=1, inner="pp")
    assert links.rank_speeds == (0.5, 0.5)  # every rank has a replica on a slow node


def test_each_rank_fits_its_own_devices_memory():
    # 64 MiB of activations per layer and micro-batch: 1F1B's rank 0 holds 4 micro-batches of its
    # 3 layers (768 MiB + weights); 1 GiB devices fit that, 600 MiB ones do not.
    costs = _costs(activation_bytes=64 * MiB)
    small = {"name": "small", "count": 2, "speed": 1.0, "memory": "700MiB", "reserve": "100MiB"}
    big = {"name": "big", "count": 2, "speed": 1.0, "memory": "16GiB"}
    roomy = _plan(_mix(dict(small, memory="16GiB", reserve="1GiB"), big), costs).choice
    assert roomy.recompute == ()
    choice = _plan(_mix(small, big), costs).choice
    assert choice.rank_limits == (600 * MiB, 600 * MiB, 15 * 2**30, 15 * 2**30)
    for rank, memory in enumerate(choice.memory):
        assert memory.total <= choice.rank_limits[rank]
    # Only the small devices' ranks recompute; the big ones keep their activations.
    recomputed_ranks = {stage for stage in choice.recompute}
    assert recomputed_ranks and recomputed_ranks <= {0, 1}
    # The same mix with the small devices last: rank 0 (the fullest) is big and needs no recompute.
    flipped = _plan(_mix(big, small), costs).choice
    assert all(stage in (2, 3) for stage in flipped.recompute)
    assert flipped.step_time <= choice.step_time


def test_a_mix_too_small_names_the_rank_and_its_devices():
    costs = _costs(activation_bytes=64 * MiB)
    tiny = {"name": "tiny", "count": 2, "speed": 1.0, "memory": "110MiB", "reserve": "100MiB"}
    with pytest.raises(NoFeasiblePlan,
                       match=r"on rank [01], whose devices give 10 MiB.*\[\[device_groups\]\]"):
        _plan(_mix(tiny, FAST), costs)


def test_plan_options_take_the_mix_device_count():
    mix = _mix(FAST, SLOW)
    options = PlanOptions(num_ranks=2, global_batch=8, hardware=mix)
    assert options.num_devices == 4  # pp pinned to 2: dp x tp split the rest
    assert options.memory_limit == 15 * 2**30
    with pytest.raises(ConfigError, match=r"num_devices = 8.*4 devices in device_groups \(2 fast \+ 2 slow\)"
                       r".*num_devices = 4"):
        PlanOptions(num_devices=8, global_batch=8, hardware=mix)
    with pytest.raises(ConfigError, match="num_ranks"):
        PlanOptions(num_ranks=3, global_batch=8, hardware=mix)


@pytest.mark.parametrize(("change", "match"), [
    ({"count": 0}, r"device_groups\[1\]\.count = 0; .*>= 1"),
    ({"count": 3}, r"device_groups\[1\]\.count = 3 is not a multiple of devices_per_node = 2; .*\(2 or 4\)"),
    ({"speed": 0}, r"device_groups\[1\]\.speed = 0; give a finite number > 0"),
    ({"speed": -0.5}, r"device_groups\[1\]\.speed = -0.5"),
    ({"speed": None}, r"device_groups\[1\] gives neither speed nor peak_flops; give exactly one"),
    ({"peak_flops": 1e12}, r"device_groups\[1\] gives speed and peak_flops; give exactly one"),
    ({"memory": None}, r"device_groups\[1\]\.memory is missing"),
    ({"memory": 0}, r"device_groups\[1\]\.memory = 0"),
    ({"reserve": "16GiB"}, r"device_groups\[1\]\.reserve = \d+ is not below its memory"),
    ({"name": ""}, r"device_groups\[1\]\.name = ''"),
    ({"colour": "red"}, r"device_groups\[1\]: unknown field\(s\) \['colour'\]"),
])
def test_bad_groups_are_refused_with_field_value_and_fix(change, match):
    slow = dict(SLOW)
    for key, value in change.items():
        if value is None:
            del slow[key]
        else:
            slow[key] = value
    with pytest.raises(ConfigError, match=match) as raised:
        _mix(FAST, slow)
    assert "mix.toml" in str(raised.value)


def test_empty_groups_are_refused():
    with pytest.raises(ConfigError, match=r"device_groups = \[\]; give one or more"):
        _mix()


MIXED_TOML = """
name = "mixed-pair"
devices_per_node = 2

[compute]
default_dtype = "fp32"
memory_bandwidth = 1e12
peak_flops = { fp32 = 1e12 }
matmul = { max_efficiency = 1.0, half_flops = 1.0 }

[memory]
bytes = "16GiB"
reserve = "1GiB"

[links.intra_node]
bandwidth = 1e11
latency = 0.0

[links.inter_node]
bandwidth = 1e11
latency = 0.0

[[device_groups]]
name = "new"
count = 2
speed = 1.0
memory = "16GiB"

[[device_groups]]
name = "old"
count = 2
speed = 0.5
memory = "8GiB"
"""


def test_cli_plans_on_a_mixed_hardware_file(tmp_path, capsys):
    hardware = tmp_path / "mixed.toml"
    hardware.write_text(MIXED_TOML)
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(_costs().to_json()))
    argv = ["plan", "--costs", str(costs), "--hardware", str(hardware), "--ranks", "4", "--batch-size", "8",
            "--schedule", "1f1b", "--virtual", "1", "--order-search", "0"]
    assert main([*argv, "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    assert choice["rank_speeds"] == [1.0, 1.0, 0.5, 0.5]
    assert choice["rank_limits"] == [15 * 2**30, 15 * 2**30, 7 * 2**30, 7 * 2**30]
    assert choice["pipeline_kwargs"]["partition"] == [4, 4, 2, 2]
    assert main(argv) == 0
    assert ("devices (a mix): ranks 0-1 speed 1, 15 GiB; ranks 2-3 speed 0.5, 7 GiB; "
            "layers per rank 4, 4, 2, 2") in capsys.readouterr().out
    # Without --ranks the search splits the mix's 4 devices; --devices 8 is refused.
    assert main([*argv[:5], "--batch-size", "8", "--order-search", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["choice"]["num_devices"] == 4
    assert main([*argv[:5], "--devices", "8", "--batch-size", "8"]) != 0
    assert "num_devices = 8" in capsys.readouterr().err


def test_replicas_are_placed_so_that_ranks_keep_their_devices_speed():
    # Two nodes of 2, fast then slow, dp=2 x pp=2: with dp inside a node each rank's replicas are
    # on one kind (rank 0 fast, rank 1 slow); with pp inside, every rank has a slow replica.
    # The layers send far more than they all-reduce, which alone would put pp inside a node.
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=MiB, output_bytes=64 * MiB,
                      parameter_bytes=1024)
    costs = ModelCosts(layers=(layer,) * 12, reference_rows=1)
    mix = _mix(FAST, SLOW)
    result = plan(costs, PlanOptions(num_ranks=2, data_parallel=2, global_batch=8, hardware=mix,
                                        schedules=("1f1b",), virtual=1, order_search_s=0))
    assert result.choice.rank_speeds == (1.0, 0.5)
    assert "dp=2 inside a node" in result.choice.placed
