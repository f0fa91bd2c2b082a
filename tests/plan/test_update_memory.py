"""The update's temporaries in the plan's memory (`pipefold.plan.update_memory`, `RankMemory.update`):
the formulas, a rank's whole-step peak, and old cost files and plans read as before. The
temporaries themselves are measured against torch in tests/runtime/test_update_temporaries.py."""

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, RankMemory
from pipefold.plan.estimate import GptEstimate, gpt_parameter_no_decay, gpt_parameter_numels
from pipefold.plan.evaluate import evaluate
from pipefold.plan.hardware import hardware_from_mapping, load_hardware
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.plan.update_memory import (
    gradient_norm_bytes,
    layer_norm_bytes,
    overflow_check_bytes,
    update_temporaries,
)
from pipefold.simulate import CostModel, Link


def test_gradient_norm_holds_the_previous_values_and_two_copies_of_the_current():
    # float64: 8 bytes x (previous + 2 x current) at its most, over consecutive tensors.
    assert gradient_norm_bytes([10, 100, 5]) == 8 * (10 + 2 * 100)
    assert gradient_norm_bytes([100, 10, 99]) == 8 * (10 + 2 * 99)
    assert gradient_norm_bytes([7]) == 8 * 14
    assert gradient_norm_bytes([]) == 0


def test_a_layers_norm_copies_take_the_previous_layers_last_tensor():
    assert layer_norm_bytes([[10, 100], [5], [], [7, 1]]) == [8 * (10 + 200), 8 * (100 + 10), 0, 8 * (5 + 14)]
    layers = [[10, 100], [5, 300], [7]]
    assert max(layer_norm_bytes(layers)) == gradient_norm_bytes([n for layer in layers for n in layer])


def test_foreach_prices_a_list_per_byte_and_single_tensor_the_largest_tensor():
    numels = [1000, 10, 4000, 10]
    foreach = update_temporaries(numels, value_bytes=4, foreach=True, masters=False)
    # One fp32 sqrt per fp32 parameter of the larger group; nothing for the whole rank.
    assert foreach["update_group_bytes_per_parameter_byte"] == 1.0
    assert foreach["update_bytes_per_parameter_byte"] == 0.0
    assert foreach["update_tensor_bytes"] == 0
    single = update_temporaries(numels, value_bytes=4, foreach=False, masters=False)
    assert single["update_bytes_per_parameter_byte"] == single["update_group_bytes_per_parameter_byte"] == 0.0
    # sqrt and its division of the largest, fp32, while the previous denominator is bound: the
    # plan takes the second largest for it.
    assert single["update_tensor_bytes"] == 4 * (2 * 4000 + 1000)
    # bf16 weights with fp32 masters: every gradient copied to fp32 (2 per bf16 byte), and the
    # foreach list in fp32 (2 more).
    pure = update_temporaries(numels, value_bytes=2, foreach=True, masters=True)
    assert (pure["update_bytes_per_parameter_byte"] == 2.0
            and pure["update_group_bytes_per_parameter_byte"] == 2.0)
    pure_single = update_temporaries(numels, value_bytes=2, foreach=False, masters=True)
    assert pure_single["update_bytes_per_parameter_byte"] == 2.0
    assert pure_single["update_group_bytes_per_parameter_byte"] == 0.0
    assert pure_single["update_tensor_bytes"] == 36000
    assert foreach["gradient_norm_bytes"] == single["gradient_norm_bytes"] == 8 * (10 + 2 * 4000)


def test_single_tensor_prices_the_two_largest_within_a_group():
    # The 4000 and 3000 are in different groups: AdamW never holds them together.
    numels = [4000, 3000, 1000, 10]
    grouped = update_temporaries(numels, value_bytes=4, foreach=False, masters=False,
                                 no_decay=[False, True, False, True])
    assert grouped["update_tensor_bytes"] == 4 * max(2 * 4000 + 1000, 2 * 3000 + 10)
    assert update_temporaries(numels, value_bytes=4, foreach=False, masters=False)["update_tensor_bytes"] == (
        4 * (2 * 4000 + 3000))  # one group: as before
    with pytest.raises(ValueError, match="no_decay has 2 entries for 4 parameters"):
        update_temporaries(numels, value_bytes=4, foreach=False, masters=False, no_decay=[True, False])


def test_the_overflow_check_never_exceeds_the_gradient_norm_it_precedes():
    # fp16's check holds (element bytes + 3) x the largest gradient; the norm 8 x (prev + 2 x it).
    for numels in ([10, 100, 5], [7], [1, 2, 3, 4000], [4000, 1]):
        for element_bytes in (2, 4):
            assert overflow_check_bytes(numels, element_bytes) == (element_bytes + 3) * max(numels)
            assert overflow_check_bytes(numels, element_bytes) < gradient_norm_bytes(numels)
    assert overflow_check_bytes([], 4) == 0


def _costs(no_decay=(0, 0, 0, 0), **update):
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1000, output_bytes=10,
                             parameter_bytes=4000, no_decay_parameter_bytes=free) for free in no_decay)
    return ModelCosts(layers=layers, **update)


def _memory(costs, num_microbatches=1):
    candidate = evaluate(costs, Config("1f1b", 1, num_microbatches, 1), num_ranks=2, bounds=(0, 2, 4),
                         recompute=(), link=Link())
    return candidate


def test_a_rank_peaks_in_the_update_when_its_temporaries_exceed_its_activations():
    plain = _memory(_costs())
    assert all(rank.update == 0 and rank.total == rank.pipeline_total for rank in plain.memory)
    # foreach on 8000 bytes a rank: 8000 bytes of square roots, more than one micro-batch's 2000.
    priced = _memory(_costs(update_bytes_per_parameter_byte=1.0, gradient_norm_bytes=100))
    for old, rank in zip(plain.memory, priced.memory, strict=True):
        assert rank.pipeline_total == old.total  # the pipeline's part is unchanged
        assert rank.update == 8000
        assert rank.update_total == rank.weights + rank.gradients + rank.optimizer + 8000
        assert rank.total == rank.update_total > rank.pipeline_total
    state = max(rank.weights + rank.gradients + rank.optimizer for rank in plain.memory)
    assert priced.peak_memory == state + 8000
    assert priced.over_limit(plain.peak_memory) > 0  # what fitted before no longer does
    # The norm's copies, when larger, are the update's peak (the two never overlap).
    norm = _memory(_costs(update_bytes_per_parameter_byte=1.0, gradient_norm_bytes=9000))
    assert [rank.update for rank in norm.memory] == [9000, 9000]
    # Single-tensor: one tensor's temporaries added to the per-byte part (masters' gradient copies).
    single = _memory(_costs(update_bytes_per_parameter_byte=2.0, update_tensor_bytes=500))
    assert [rank.update for rank in single.memory] == [16500, 16500]


def test_foreach_prices_a_ranks_larger_group():
    # Rank 0 holds 8000 bytes, 5000 of them without decay: its list is the 5000's; rank 1 holds
    # 1000 undecayed, its list is the 7000 decayed. Masters' copies (per byte) are the whole rank's.
    group = _memory(_costs(no_decay=(4000, 1000, 1000, 0), update_group_bytes_per_parameter_byte=1.0))
    assert [rank.update for rank in group.memory] == [5000, 7000]
    both = _memory(_costs(no_decay=(4000, 1000, 1000, 0), update_group_bytes_per_parameter_byte=2.0,
                          update_bytes_per_parameter_byte=2.0))
    assert [rank.update for rank in both.memory] == [16000 + 10000, 16000 + 14000]
    # Without the layers' split (a cost file written before it) the larger group is the whole rank,
    # and an old file's per-byte field prices as it did.
    assert [
        rank.update for rank in _memory(_costs(update_group_bytes_per_parameter_byte=1.0)).memory
    ] == [8000, 8000]
    assert [
        rank.update for rank in _memory(_costs(update_bytes_per_parameter_byte=1.0)).memory
    ] == [8000, 8000]


def test_a_tied_weight_a_rank_holds_twice_counts_once_in_its_undecayed_group():
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1000, output_bytes=10,
                             parameter_bytes=size, no_decay_parameter_bytes=free)
                   for size, free in ((3000, 3000), (4000, 0), (4000, 0), (3000, 3000)))
    costs = ModelCosts(layers=layers, tied_layers=((0, 3),), update_group_bytes_per_parameter_byte=1.0)
    # One rank holds all four layers: 11000 bytes, the tied 3000 once, undecayed.
    alone = evaluate(costs, Config("1f1b", 1, 1, 1), num_ranks=1, bounds=(0, 4), recompute=(), link=Link())
    assert alone.memory[0].update == 8000
    split = evaluate(costs, Config("1f1b", 1, 1, 1), num_ranks=2, bounds=(0, 2, 4), recompute=(), link=Link())
    assert [rank.update for rank in split.memory] == [4000, 4000]


def test_a_layers_undecayed_part_is_checked_and_travels_in_cost_files():
    with pytest.raises(ConfigError, match="no_decay_parameter_bytes = 5000 exceeds parameter_bytes = 4000"):
        _costs(no_decay=(5000, 0, 0, 0))
    with pytest.raises(ConfigError, match="no_decay_parameter_bytes"):
        _costs(no_decay=(-1, 0, 0, 0))
    split = _costs(no_decay=(4000, 10, 0, 0), update_group_bytes_per_parameter_byte=1.0)
    data = split.to_json()
    assert [layer.get("no_decay_parameter_bytes") for layer in data["layers"]] == [4000, 10, None, None]
    assert ModelCosts.from_json(data) == split
    assert "no_decay_parameter_bytes" not in str(_costs().to_json())  # written only where known
    model = stage_cost_model(split, StageLayout((0, 2, 4), 1), (), Link())
    assert model.no_decay_weight_bytes == (4010, 0)
    assert CostModel.from_json(model.to_json()) == model
    assert "no_decay_weight_bytes" not in stage_cost_model(_costs(), StageLayout((0, 2, 4), 1), (),
                                                           Link()).to_json()


def test_each_rank_prices_its_own_layers_norm():
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1000, output_bytes=10,
                             parameter_bytes=4000, gradient_norm_bytes=norm)
                   for norm in (9000, 100, 300, 200))
    costs = ModelCosts(layers=layers, gradient_norm_bytes=9000)
    assert [rank.update for rank in _memory(costs).memory] == [9000, 300]
    model = stage_cost_model(costs, StageLayout((0, 1, 3, 4), 1), (), Link())
    assert model.gradient_norm_bytes == (9000, 300, 200)
    assert CostModel.from_json(model.to_json()) == model
    assert ModelCosts.from_json(costs.to_json()) == costs
    # Layers without their own (a cost file written before them): the model's on every rank.
    assert [rank.update for rank in _memory(_costs(gradient_norm_bytes=9000)).memory] == [9000, 9000]
    assert "gradient_norm_bytes" not in stage_cost_model(
        _costs(), StageLayout((0, 2, 4), 1), (), Link()).to_json()


def test_the_update_hides_under_a_larger_activation_peak():
    # GPipe at 8 micro-batches holds 8 x 2000 activation bytes on rank 0; the update's 8000 less.
    costs = _costs(update_bytes_per_parameter_byte=1.0)
    candidate = evaluate(costs, Config("gpipe", 1, 8, 1), num_ranks=2, bounds=(0, 2, 4), recompute=(),
                         link=Link())
    assert all(rank.update == 8000 and rank.total == rank.pipeline_total for rank in candidate.memory)


def test_plan_json_keeps_its_fields_and_reads_old_plans():
    rank = RankMemory(weights=10, gradients=10, optimizer=20, activations=5, recompute=1, casts=2, update=30)
    data = rank.to_json()
    assert {"weights", "gradients", "optimizer", "activations", "recompute", "casts", "total"} <= set(data)
    assert (data["update"], data["pipeline_total"], data["update_total"], data["total"]) == (30, 48, 70, 70)
    assert RankMemory.from_json(data) == rank
    old = {"weights": 10, "gradients": 10, "optimizer": 20, "activations": 5, "recompute": 1, "casts": 2,
           "total": 48}
    assert RankMemory.from_json(old).total == 48 and RankMemory.from_json(old).update == 0


def test_cost_files_write_the_update_only_where_priced_and_read_either_way():
    plain = _costs()
    assert "update_bytes_per_parameter_byte" not in plain.to_json()
    assert ModelCosts.from_json(plain.to_json()) == plain
    priced = _costs(update_bytes_per_parameter_byte=1.0, update_tensor_bytes=64, gradient_norm_bytes=128)
    assert ModelCosts.from_json(priced.to_json()) == priced
    with pytest.raises(ConfigError, match="update_tensor_bytes"):
        _costs(update_tensor_bytes=-1)


def test_the_hardware_files_device_picks_the_path_the_estimate_prices():
    assert load_hardware("cpu").device == "cpu"
    assert load_hardware("h100-80gb").device == "cuda"  # a file without `device`: CUDA
    shape = dict(num_layers=2, d_model=64, num_heads=4, seq_len=32, vocab_size=256, dtype="fp32")
    numels = gpt_parameter_numels(2, 64, 32, 256, 1, tied=True)
    on_gpu = GptEstimate(hardware=load_hardware("h100-80gb"), **shape).at(1, 1, Link(), False)
    assert on_gpu.update_group_bytes_per_parameter_byte == 1.0 and on_gpu.update_tensor_bytes == 0
    assert on_gpu.update_bytes_per_parameter_byte == 0.0
    on_cpu = GptEstimate(hardware=load_hardware("cpu"), **shape).at(1, 1, Link(), False)
    assert on_cpu.update_bytes_per_parameter_byte == 0.0
    # Per group, its two largest: the MLP's two 4h x h matrices (decayed; as large as the tied
    # 256 x h embedding, whose group's second is the smaller position table).
    assert on_cpu.update_tensor_bytes == 4 * (2 * 4 * 64 * 64 + 4 * 64 * 64) > 4 * (2 * 256 * 64 + 32 * 64)
    assert on_cpu.gradient_norm_bytes == on_gpu.gradient_norm_bytes == gradient_norm_bytes(numels)
    pure = GptEstimate(hardware=load_hardware("h100-80gb"), **{**shape, "dtype": "bf16"},
                       parameter_bytes=2).at(1, 1, Link(), False)
    assert pure.update_bytes_per_parameter_byte == 2.0 and pure.update_group_bytes_per_parameter_byte == 2.0


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("tp", [1, 2])
def test_the_estimates_layers_split_as_its_parameters(tied, tp):
    # The layers' undecayed bytes sum to the flagged tensors' (one tp rank's, a tied one at each holder).
    shape = dict(num_layers=2, d_model=64, num_heads=4, seq_len=32, vocab_size=256, dtype="fp32",
                 tie_embeddings=tied)
    costs = GptEstimate(hardware=load_hardware("h100-80gb"), **shape).at(1, tp, Link(), False)
    numels = gpt_parameter_numels(2, 64, 32, 256, tp, tied=tied)
    flags = gpt_parameter_no_decay(2, tied=tied)
    free = 4 * sum(n for n, exempt in zip(numels, flags, strict=True) if exempt)
    held_twice = 4 * 256 * 64 if tied else 0  # the head holds the embedding again
    assert sum(layer.no_decay_parameter_bytes for layer in costs.layers) == free + held_twice
    assert costs.parameter_bytes == 4 * sum(numels) + held_twice
    # Each layer's norm copies: the blocks' largest (the MLP's pair), the embedding's own table.
    h = 64
    block = 8 * (max(h, 4 * h // tp) + 2 * 4 * h * h // tp)
    assert [layer.gradient_norm_bytes for layer in costs.layers] == [
        8 * 2 * 256 * h, 8 * (256 * h + 2 * 32 * h), block, block, 8 * 3 * h, 8 * (h + 2 * 256 * h)]


def test_a_hardware_file_with_an_unknown_device_is_refused():
    preset = load_hardware("cpu")
    assert preset.device == "cpu"
    with pytest.raises(ConfigError, match=r"device = 'tpu'.*cuda, cpu"):
        hardware_from_mapping({"name": "x", "device": "tpu", "devices_per_node": 1}, "x.toml")


def test_tensor_parallel_shrinks_the_per_rank_tensors():
    whole = gpt_parameter_numels(2, 64, 32, 256, 1, tied=True)
    split = gpt_parameter_numels(2, 64, 32, 256, 2, tied=True)
    assert sum(split) < sum(whole) and max(split) == max(whole)  # the embedding stays whole
    assert len(gpt_parameter_numels(2, 64, 32, 256, 1, tied=False)) == len(whole) + 1


PLAN = ["plan", "--model", "gpt", "--hardware", "h100-80gb", "--num-layers", "2", "--d-model", "256",
        "--num-heads", "4", "--seq-len", "32", "--vocab-size", "256", "--batch-size", "4", "--ranks", "1",
        "--schedule", "1f1b", "--microbatches", "4", "--recompute", "full", "--order-search", "0", "--dtype",
        "fp32"]


def test_the_plan_shows_where_a_rank_peaks_and_its_json_keeps_every_field(capsys):
    import json

    from pipefold.cli.main import main

    assert main(PLAN) == 0
    assert "rank 0's peak is in the update" in " ".join(capsys.readouterr().out.split())
    assert main([*PLAN, "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["choice"]["memory"][0]
    assert memory["update"] > 0 and memory["total"] == memory["update_total"] > memory["pipeline_total"]
    assert memory["total"] == memory["weights"] + memory["gradients"] + memory["optimizer"] + memory["update"]
