import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipefold.errors import ConfigError, PartitionError
from pipefold.model import LayerSpec, Partition, balance, partition, stage_times

from .models import WIDTH, Block, Final, transformer


def linears(num_layers: int) -> list[LayerSpec]:
    return [LayerSpec(nn.Linear, 2, 2) for _ in range(num_layers)]


# --- Partition ------------------------------------------------------------------------------


def test_partition_value_reads_and_round_trips():
    cut = Partition.from_counts([3, 3, 2])
    assert cut.bounds == (0, 3, 6, 8)
    assert str(cut) == "[0:3 | 3:6 | 6:8]"
    assert Partition.parse(str(cut)) == cut
    assert Partition.parse("[0:1|1:2]") == Partition((0, 1, 2))
    assert (cut.num_stages, cut.num_layers, cut.counts) == (3, 8, (3, 3, 2))
    assert cut.layers_of(1) == range(3, 6)
    assert [cut.stage_of(layer) for layer in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_partition_bounds_are_normalized_to_a_tuple_of_ints():
    cut = Partition([0, np.int64(2), 4])
    assert cut.bounds == (0, 2, 4) and all(type(b) is int for b in cut.bounds)
    assert hash(cut) == hash(Partition((0, 2, 4)))


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: Partition((1, 3)), r"must start at 0, got \(1, 3\)"),
        (lambda: Partition((0,)), r"at least 2 integers.*got \(0,\)"),
        (lambda: Partition((0, 1.5)), r"at least 2 integers.*got \(0, 1.5\)"),
        (lambda: Partition(3), r"at least 2 integers.*got 3"),
        (lambda: Partition((0, 2, 2, 4)), r"give stage 1 no layers \(2:2\)"),
        (lambda: Partition.from_counts([2, 0]), r"give stage 1 0 layers"),
        (lambda: Partition.from_counts([]), r"non-empty list of integers, got \[\]"),
        (lambda: Partition.parse("[0:2 | 3:4]"), r"cannot read partition '\[0:2 \| 3:4\]'"),
        (lambda: Partition.parse("0-2"), r"cannot read partition '0-2'"),
        (lambda: Partition((0, 2)).layers_of(1), r"stage 1 does not exist; .* stages 0..0"),
        (lambda: Partition((0, 2)).stage_of(2), r"layer 2 does not exist; .* layers 0..1"),
    ],
)
def test_bad_partitions_raise_partition_error(make, pattern):
    with pytest.raises(PartitionError, match=pattern):
        make()


# --- named methods --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_layers", "num_stages", "expected"),
    [
        (8, 3, "[0:3 | 3:6 | 6:8]"),
        (7, 3, "[0:3 | 3:5 | 5:7]"),
        (6, 6, "[0:1 | 1:2 | 2:3 | 3:4 | 4:5 | 5:6]"),
        (5, 1, "[0:5]"),
        (10, 4, "[0:3 | 3:6 | 6:8 | 8:10]"),
    ],
)
def test_uniform_is_as_even_as_possible(num_layers, num_stages, expected):
    assert str(partition(linears(num_layers), num_stages)) == expected


def test_uniform_accepts_sequential_and_counts_modules():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    assert str(partition(model, 2, "uniform")) == "[0:2 | 2:4]"


def test_parameters_balances_parameter_counts_on_meta():
    # 10**10 parameters: materializing this layer (40 GB) would fail, so this proves counting happens on meta.
    layers = [LayerSpec(nn.Linear, 100_000, 100_000), LayerSpec(nn.Linear, 2, 2), LayerSpec(nn.Linear, 2, 2)]
    assert str(partition(layers, 2, "parameters")) == "[0:1 | 1:3]"


def test_parameters_known_optimum():
    # Parameter counts 110, 0, 110, 0, 30 x 5: the two 110s must part, so the best slowest stage is 140.
    layers = [
        nn.Linear(10, 10),
        nn.ReLU(),
        nn.Linear(10, 10),
        nn.ReLU(),
        *[nn.Linear(5, 5) for _ in range(5)],
    ]
    cut = partition(layers, 3, "parameters")
    counts = [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
    assert max(stage_times(cut, counts)) == 140.0
    assert str(cut) == "[0:2 | 2:5 | 5:9]"


def test_type_regex_balances_matching_layers_only():
    layers = transformer(num_blocks=4)  # Embed, Block x4, Final, Embed(head)
    assert str(partition(layers, 2, "type:Block")) == "[0:3 | 3:7]"
    assert str(partition(layers, 4, "type:^Block$")) == "[0:2 | 2:3 | 3:4 | 4:7]"
    # Non-matching layers cost nothing: both Block and Final balanced as equals here.
    assert str(partition(layers, 5, "type:Block|Final")) == "[0:2 | 2:3 | 3:4 | 4:5 | 5:7]"


def test_type_regex_is_case_sensitive_and_names_the_classes():
    with pytest.raises(
        PartitionError, match=r"'type:block' matches no layer class.*\['Block', 'Embed', 'Final'\]"
    ):
        partition(transformer(), 2, "type:block")


def test_type_regex_must_compile():
    with pytest.raises(PartitionError, match=r"'type:\(' has an invalid regex"):
        partition(transformer(), 2, "type:(")


def test_explicit_counts_and_partitions_pass_through():
    assert partition(linears(5), 2, [4, 1]) == Partition((0, 4, 5))
    assert partition(linears(5), 2, Partition((0, 1, 5))) == Partition((0, 1, 5))


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: partition(linears(3), 4), "cannot cut 3 layers into 4 stages.*at most 3 stages"),
        (lambda: partition(linears(3), 0), "num_stages = 0; it must be an integer >= 1"),
        (lambda: partition(linears(8), 2, [3, 4]), r"covers 7 layers but the model has 8.*sum to 8"),
        (lambda: partition(linears(8), 3, [4, 4]), r"\[0:4 \| 4:8\] has 2 stages but num_stages is 3"),
        (lambda: partition(linears(4), 2, "even"), "unknown partition method 'even'; use one of"),
        (lambda: partition(linears(4), 2, 3), "method must be a name .* got 3"),
        (lambda: partition(linears(4), 2, costs=[1, 1, 1, 1]), "costs= is only used by method='profile'"),
        (lambda: partition(linears(4), 2, "profile"), r"needs per-layer costs= \(seconds\)"),
        (
            lambda: partition(linears(4), 2, "profile", costs=[1, 2]),
            "costs has 2 entries but the model has 4",
        ),
        (lambda: partition(linears(2), 2, "profile", costs=[1, -1]), r"costs\[1\] = -1; .* finite and >= 0"),
        (
            lambda: partition(linears(4), 2, speeds=[1, 2, 3]),
            "speeds has 3 entries .* 2 stages; pass placement=",
        ),
        (lambda: partition(linears(4), 2, speeds=[1, 0]), r"speeds\[1\] = 0; .* > 0"),
        (
            lambda: partition(linears(4), 2, speeds=[1, 2], placement=[0, 2]),
            r"placement\[1\] = 2 is not a rank",
        ),
        (lambda: partition(linears(4), 2, placement=[0]), "placement has 1 entries but there are 2 stages"),
    ],
)
def test_impossible_requests_name_the_values(call, pattern):
    with pytest.raises(PartitionError, match=pattern):
        call()


def test_empty_model_is_a_config_error():
    with pytest.raises(ConfigError, match="layers is empty"):
        partition([], 1)


# --- exact min-max solver -------------------------------------------------------------------


def brute_force(costs, speeds):
    """Every cut: (slowest stage, sum of squared stage times) of the best one."""
    num_layers, num_stages = len(costs), len(speeds)
    best = None
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        bounds = (0, *cuts, num_layers)
        times = [sum(costs[a:b]) / speed for a, b, speed in zip(bounds[:-1], bounds[1:], speeds, strict=True)]
        if best is None or max(times) < best:
            best = max(times)
    return best


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_profile_method_is_exact(data):
    num_layers = data.draw(st.integers(1, 8))
    num_stages = data.draw(st.integers(1, num_layers))
    costs = data.draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=num_layers, max_size=num_layers))
    speeds = data.draw(st.lists(st.floats(0.25, 4), min_size=num_stages, max_size=num_stages))
    cut = partition(linears(num_layers), num_stages, "profile", costs=costs, speeds=speeds)
    assert cut.num_stages == num_stages and cut.num_layers == num_layers
    assert max(stage_times(cut, costs, speeds)) == pytest.approx(
        brute_force(costs, speeds), rel=1e-12, abs=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_ties_keep_the_other_stages_even(data):
    # Integer costs make ties common; among optimal cuts the sum of squares must be least.
    num_layers = data.draw(st.integers(2, 8))
    num_stages = data.draw(st.integers(2, num_layers))
    costs = data.draw(st.lists(st.integers(0, 3), min_size=num_layers, max_size=num_layers))
    cut = balance(costs, num_stages)
    best = brute_force(costs, [1.0] * num_stages)
    times = stage_times(cut, costs)
    assert max(times) == best
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        other = stage_times(Partition((0, *cuts, num_layers)), costs)
        if max(other) == best:
            assert sum(t * t for t in times) <= sum(t * t for t in other)


def test_faster_ranks_get_more_layers():
    layers = linears(4)
    assert str(partition(layers, 2, speeds=[1, 1])) == "[0:2 | 2:4]"
    assert str(partition(layers, 2, speeds=[1, 3])) == "[0:1 | 1:4]"
    assert str(partition(layers, 2, speeds=[3, 1])) == "[0:3 | 3:4]"


def test_speeds_follow_the_placement():
    # Stages 0 and 2 sit on the twice-as-fast rank 1 (placement [1, 0, 1, 0]), so they get the layers:
    # 4/2, 1/1, 4/2, 1/1 -> slowest 2.0 (as even as 4, 2, 2, 2 but with fewer squares).
    layers = linears(10)
    cut = partition(layers, 4, "profile", costs=[1.0] * 10, speeds=[1, 2], placement=[1, 0, 1, 0])
    assert cut.counts == (4, 1, 4, 1)
    uniform_speeds = partition(layers, 4, "profile", costs=[1.0] * 10, placement=[1, 0, 1, 0])
    assert uniform_speeds.counts == (3, 3, 2, 2)
    assert max(stage_times(cut, [1.0] * 10, [2, 1, 2, 1])) == 2.0


def test_fixture_classes_exist():
    # partition's type: tests depend on these names.
    assert (Block(WIDTH).__class__.__name__, Final().__class__.__name__) == ("Block", "Final")
