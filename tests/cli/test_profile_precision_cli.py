"""`pipefold profile --precision` and `pipefold plan --profile --precision` through the real parser,
on a tiny GPT (one process)."""

import json
import shlex

import pytest
import torch

from pipefold.cli.main import main
from pipefold.plan import ModelCosts

MODEL = ["--num-layers", "2", "--d-model", "16", "--num-heads", "2", "--seq-len", "8", "--batch-size", "4"]
TINY = [*MODEL, "--microbatches", "2", "--repeats", "1", "--device", "cpu"]


def _costs(capsys, precision):
    assert main(["profile", *TINY, "--json", "--precision", precision]) == 0
    return ModelCosts.from_json(json.loads(capsys.readouterr().out))


def test_profile_in_bf16_prices_16_bit_boundaries_and_fp32_state(capsys):
    fp32, bf16, pure = (_costs(capsys, p) for p in ("fp32", "bf16", "bf16-pure"))
    assert "bf16" not in fp32.source and fp32.source.startswith("measured on cpu, 1 thread(s), median")
    assert bf16.source.startswith("measured on cpu, 1 thread(s), bf16, median")
    # Every boundary but the last (the loss's fp32 input) in 2 bytes a value.
    assert [layer.output_bytes for layer in bf16.layers[:-1]] == [2 * 8 * 16 * 2] * 5
    assert [layer.output_bytes for layer in fp32.layers[:-1]] == [2 * 8 * 16 * 4] * 5
    assert sum(layer.activation_bytes for layer in bf16.layers) < sum(
        layer.activation_bytes for layer in fp32.layers)
    # Autocast keeps fp32 weights, gradients and AdamW moments, and a 16-bit copy of the matrix weights.
    assert bf16.parameter_bytes == fp32.parameter_bytes
    assert (bf16.gradient_bytes_per_parameter_byte, bf16.optimizer_bytes_per_parameter_byte) == (1.0, 2.0)
    assert fp32.cast_bytes_per_parameter_byte == 0 < bf16.cast_bytes_per_parameter_byte < 0.5
    # bf16 weights and gradients, fp32 master and moments: 12 bytes a weight in the optimizer.
    assert pure.parameter_bytes * 2 == fp32.parameter_bytes
    assert (pure.gradient_bytes_per_parameter_byte, pure.optimizer_bytes_per_parameter_byte) == (1.0, 6.0)
    assert pure.cast_bytes_per_parameter_byte == 0


def test_plan_profile_in_bf16_prices_the_casts_and_trains_in_bf16(capsys):
    argv = ["plan", "--profile", *MODEL, "--repeats", "1", "--device", "cpu", "--ranks", "2",
            "--microbatches", "2", "--schedule", "1f1b", "--order-search", "0", "--json",
            "--calibrate-steps", "0"]
    plans = {}
    for precision in ("fp32", "bf16"):
        assert main([*argv, "--precision", precision]) == 0
        plans[precision] = json.loads(capsys.readouterr().out)
    words = shlex.split(plans["bf16"]["train_command"])
    assert words[words.index("--precision") + 1] == "bf16"
    for fp32, bf16 in zip(plans["fp32"]["choice"]["memory"], plans["bf16"]["choice"]["memory"], strict=True):
        assert fp32["casts"] == 0 < bf16["casts"]
        assert (bf16["weights"], bf16["optimizer"]) == (fp32["weights"], fp32["optimizer"])
        assert bf16["activations"] < fp32["activations"]


def test_an_unknown_precision_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["profile", *TINY, "--precision", "bf32"])
    err = capsys.readouterr().err
    assert "argument --precision: invalid choice: 'bf32'" in err and "bf16-pure" in err


def test_a_measurement_still_refuses_the_estimates_bytes_flag(capsys):
    assert main(["plan", "--profile", *MODEL, "--device", "cpu", "--precision", "bf16",
                 "--bytes-per-value", "2"]) == 2
    assert "--bytes-per-value shapes the FLOP estimate" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "bf16-pure"])
def test_bf16_on_a_gpu_without_it_is_refused_before_measuring(capsys, monkeypatch, precision):
    # A GPU without bf16 (before Ampere), stood in for: the refusal comes before any CUDA work.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100")
    assert main(["profile", *MODEL, "--device", "cuda", "--precision", precision]) == 2
    assert (f"--precision = {precision!r} but Tesla V100 has no bf16; use --precision fp16 (or fp32)"
            in capsys.readouterr().err)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_the_bf16_plans_memory_is_what_the_bf16_job_counts(tmp_path, capfd):
    """`plan --profile --precision bf16` pinned to 1F1B at 2 ranks, then its train command for one
    step: per rank, weights + gradients + optimizer state + activations + autocast's held weight
    copies (which the job measures apart from its counted activations) within 10% of the job's
    count (as benchmarks/planner_memory.py --precision bf16)."""
    model = ["--num-layers", "2", "--d-model", "64", "--num-heads", "4", "--seq-len", "32",
             "--batch-size", "8"]
    assert main(["plan", "--profile", *model, "--repeats", "1", "--device", "cpu", "--ranks", "2",
                 "--schedule", "1f1b", "--microbatches", "4", "--recompute", "none", "--order-search", "0",
                 "--json", "--calibrate-steps", "0", "--precision", "bf16"]) == 0
    planned = json.loads(capfd.readouterr().out)
    out = tmp_path / "run"
    words = shlex.split(planned["train_command"])[1:] + [
        "--steps", "1", "--out", str(out), "--set", "sample_tokens=0", "--set", "eval_every=0",
        "--device", "cpu",
    ]
    assert main(words) == 0, capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "bf16"
    for entry in summary["memory"]:
        predicted = planned["choice"]["memory"][entry["pipeline_rank"]]
        assert predicted["casts"] > 0
        assert predicted["weights"] == entry["weights"]  # fp32 weights, to the byte
        counted = 2 * entry["weights"] + entry["optimizer"] + entry["activations_peak"] + entry["casts"]
        # The job's hooks count the pipeline's call as its saved tensors (the gradients beside the
        # whole peak); the plan's backward temporaries, kept receive buffers and update are apart.
        hooked = (predicted["weights"] + predicted["gradients"] + predicted["optimizer"]
                  + predicted["activations"] + predicted["casts"])
        assert abs(hooked / counted - 1) < 0.10, (predicted, entry)
        assert abs(predicted["activations"] / entry["activations_peak"] - 1) < 0.10, (predicted, entry)
    # The job measures the copies autocast holds (the biases' too) apart from its activations; the
    # plan spreads them over the ranks by their parameter bytes, so they agree in sum.
    planned_casts = sum(m["casts"] for m in planned["choice"]["memory"])
    held_casts = sum(entry["casts"] for entry in summary["memory"])
    assert planned_casts <= held_casts < planned_casts * 1.05


@pytest.mark.parametrize(("precision", "trained"),
                         [(None, "fp32"), ("bf16", "bf16"), ("bf16-pure", "bf16-pure")])
def test_the_calibration_run_trains_in_the_measured_precision(tmp_path, precision, trained):
    import argparse

    from pipefold.cli.plan_calibrate import _train_words

    args = argparse.Namespace(microbatches=2, batch_size=4, device="cpu", model=None, num_layers=2,
                              d_model=16, num_heads=2, seq_len=8, precision=precision)
    words = _train_words(args, 2, tmp_path, hf=False)
    assert words[words.index("--precision") + 1] == trained


def test_the_table_names_the_held_weight_copies(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["profile", *TINY, "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "16-bit weight copies autocast holds for a step:" in out and "bf16, median of 1" in out
    assert main(["profile", *TINY]) == 0
    assert "weight copies" not in capsys.readouterr().out
