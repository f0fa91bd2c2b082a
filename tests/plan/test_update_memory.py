"""The update's temporaries in the plan's memory (`pipefold.plan.update_memory`, `RankMemory.update`):
the formulas, a rank's whole-step peak, and old cost files and plans read as before. The
temporaries themselves are measured against torch in tests/runtime/test_update_temporaries.py."""

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, RankMemory
from pipefold.plan.estimate import GptEstimate, gpt_parameter_numels
from pipefold.plan.evaluate import evaluate
from pipefold.plan.hardware import hardware_from_mapping, load_hardware
from pipefold.plan.space import Config
from pipefold.plan.update_memory import gradient_norm_bytes, update_temporaries
from pipefold.simulate import Link


def test_gradient_norm_holds_the_previous_values_and_two_copies_of_the_current():
    # float64: 8 bytes x (previous + 2 x current) at its most, over consecutive tensors.
    assert gradient_norm_bytes([10, 100, 5]) == 8 * (10 + 2 * 100)
    assert gradient_norm_bytes([100, 10, 99]) == 8 * (10 + 2 * 99)
    assert gradient_norm_bytes([7]) == 8 * 14
    assert gradient_norm_bytes([]) == 0


def test_foreach_prices_a_list_per_byte_and_single_tensor_the_largest_tensor():
    numels = [1000, 10, 4000, 10]
    foreach = update_temporaries(numels, value_bytes=4, foreach=True, masters=False)
    assert foreach["update_bytes_per_parameter_byte"] == 1.0  # one fp32 sqrt per fp32 parameter
    assert foreach["update_tensor_bytes"] == 0
    single = update_temporaries(numels, value_bytes=4, foreach=False, masters=False)
    assert single["update_bytes_per_parameter_byte"] == 0.0
    # sqrt and its division of the largest, fp32, while the previous denominator is bound: the
    # plan takes the second largest for it.
    assert single["update_tensor_bytes"] == 4 * (2 * 4000 + 1000)
    # bf16 weights with fp32 masters: every gradient copied to fp32 (2 per bf16 byte), and the
    # foreach list in fp32 (2 more).
    pure = update_temporaries(numels, value_bytes=2, foreach=True, masters=True)
    assert pure["update_bytes_per_parameter_byte"] == 4.0
    pure_single = update_temporaries(numels, value_bytes=2, foreach=False, masters=True)
    assert pure_single["update_bytes_per_parameter_byte"] == 2.0
    assert pure_single["update_tensor_bytes"] == 36000
    assert foreach["gradient_norm_bytes"] == single["gradient_norm_bytes"] == 8 * (10 + 2 * 4000)


def _costs(**update):
    layers = tuple(LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1000, output_bytes=10,
                             parameter_bytes=4000) for _ in range(4))
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
    assert priced.peak_memory == plain.peak_memory - plain.memory[0].activations + 8000
    assert priced.over_limit(plain.peak_memory) > 0  # what fitted before no longer does
    # The norm's copies, when larger, are the update's peak (the two never overlap).
    norm = _memory(_costs(update_bytes_per_parameter_byte=1.0, gradient_norm_bytes=9000))
    assert [rank.update for rank in norm.memory] == [9000, 9000]
    # Single-tensor: one tensor's temporaries added to the per-byte part (masters' gradient copies).
    single = _memory(_costs(update_bytes_per_parameter_byte=2.0, update_tensor_bytes=500))
    assert [rank.update for rank in single.memory] == [16500, 16500]


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
    assert on_gpu.update_bytes_per_parameter_byte == 1.0 and on_gpu.update_tensor_bytes == 0
    on_cpu = GptEstimate(hardware=load_hardware("cpu"), **shape).at(1, 1, Link(), False)
    assert on_cpu.update_bytes_per_parameter_byte == 0.0
    first, second = sorted(numels, reverse=True)[:2]
    assert on_cpu.update_tensor_bytes == 4 * (2 * first + second)
    assert on_cpu.gradient_norm_bytes == on_gpu.gradient_norm_bytes == gradient_norm_bytes(numels)
    pure = GptEstimate(hardware=load_hardware("h100-80gb"), **{**shape, "dtype": "bf16"},
                       parameter_bytes=2).at(1, 1, Link(), False)
    assert pure.update_bytes_per_parameter_byte == 4.0


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
