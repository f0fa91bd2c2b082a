"""Both libraries get the same model, the same batch and the same stage layout."""

import pytest
import torch
from torch import nn

from benchmarks.harness.layout import NUM_LAYERS, stage_bounds
from benchmarks.harness.pairs import PAIRS, pair
from benchmarks.harness.pipefold_side import uniform_partition
from benchmarks.harness.sides import global_name
from benchmarks.harness.workloads import WORKLOADS, workload
from pipefold.errors import ConfigError
from pipefold.model import Partition
from pipefold.schedule import build


@pytest.mark.parametrize("name", ["mlp", "transformer", "tiny"])
def test_same_seed_builds_identical_layers_and_batch(name):
    work = workload(name)
    first, second = work.build_layers(3), work.build_layers(3)
    assert len(first) == NUM_LAYERS
    state_a = nn.Sequential(*first).state_dict()
    state_b = nn.Sequential(*second).state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)
    (x1, y1), (x2, y2) = work.make_batch(5), work.make_batch(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape[0] == work.batch_size


def test_different_seeds_differ():
    work = workload("mlp")
    a = nn.Sequential(*work.build_layers(0)).state_dict()
    b = nn.Sequential(*work.build_layers(1)).state_dict()
    assert not torch.equal(a["0.fc1.weight"], b["0.fc1.weight"])


def test_transformer_ends_hold_embedding_and_head():
    work = workload("transformer")
    layers = work.build_layers()
    inputs, targets = work.make_batch(batch_size=2)
    assert inputs.dtype == torch.int64 and inputs.shape == (2, work.seq_len)
    logits = nn.Sequential(*layers)(inputs)
    assert logits.shape == (2, work.seq_len, work.vocab)
    assert work.loss_fn(logits, targets).ndim == 0
    assert hasattr(layers[0], "tokens") and hasattr(layers[-1], "head")


def test_workloads_are_built_from_the_zoo():
    from pipefold.model.zoo import ResidualMLP
    from pipefold.model.zoo.gpt import DecoderBlock

    assert all(type(layer) is ResidualMLP for layer in workload("mlp").build_layers())
    layers = workload("transformer").build_layers()
    blocks = [layers[0].block, *layers[1:-1], layers[-1].block]
    assert len(blocks) == NUM_LAYERS and all(type(block) is DecoderBlock for block in blocks)


def test_workload_matches_issue_sizes():
    assert WORKLOADS["mlp"].batch_size == 256 and WORKLOADS["mlp"].width == 512
    transformer = WORKLOADS["transformer"]
    sizes = (transformer.width, transformer.num_heads, transformer.seq_len, transformer.vocab)
    assert sizes == (256, 4, 128, 1024)
    assert transformer.batch_size == 16


def test_unknown_workload_is_a_config_error():
    with pytest.raises(ConfigError, match="workload='cnn'"):
        workload("cnn")


@pytest.mark.parametrize("num_stages", [1, 2, 4, 8])
def test_stage_bounds_cover_layers_evenly(num_stages):
    bounds = stage_bounds(num_stages)
    assert bounds[0][0] == 0 and bounds[-1][1] == NUM_LAYERS
    assert all(stop - start == NUM_LAYERS // num_stages for start, stop in bounds)
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(num_stages - 1))
    # pipefold's partition from the counts the pipefold side passes is the same cut.
    expected = tuple(start for start, _ in bounds) + (NUM_LAYERS,)
    assert Partition.from_counts(uniform_partition(num_stages)).bounds == expected


def test_stage_bounds_refuse_uneven_split():
    with pytest.raises(ConfigError, match="num_stages=3"):
        stage_bounds(3)


@pytest.mark.parametrize("schedule", list(PAIRS))
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_pair_layout_is_pipefolds_layout(schedule, num_ranks):
    entry = pair(schedule)
    built = build(schedule, num_ranks=num_ranks, num_microbatches=16, num_virtual=entry.num_virtual)
    assert built.placement == entry.placement(num_ranks)
    for rank in range(num_ranks):
        assert tuple(entry.stages_of(rank, num_ranks)) == built.stages_of(rank)


def test_peer_refusals_follow_torch_constraints():
    assert pair("1f1b").peer_refusal(4, 2) is not None
    assert pair("1f1b").peer_refusal(2, 2) is None
    assert pair("dualpipe-v").peer_refusal(2, 2) is not None
    assert pair("dualpipe-v").peer_refusal(2, 4) is None
    assert pair("gpipe").peer_refusal(4, 1) is None


def test_global_names_offset_by_first_layer():
    assert global_name(4, "1.fc1.weight") == "5.fc1.weight"
    assert global_name(0, "0.block.ln1.bias") == "0.block.ln1.bias"
