"""`pipefold plan --hardware ... --precision`: the hardware estimate in the precision pipefold train
runs, autocast's weight copies and their time included (one process, through the real parser)."""

import json

from pipefold.cli.main import main
from pipefold.plan.hardware import load_hardware

GPT = ["plan", "--hardware", "a100-80gb", "--model", "gpt", "--ranks", "2", "--batch-size", "8",
       "--num-layers", "2", "--d-model", "64", "--num-heads", "4", "--seq-len", "32",
       "--schedule", "1f1b", "--microbatches", "4", "--recompute", "none", "--order-search", "0", "--json"]


def _plan(capsys, *extra):
    assert main([*GPT, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_precision_prices_train_s_weights_and_copies(capsys):
    fp32 = _plan(capsys, "--precision", "fp32")
    bf16 = _plan(capsys, "--precision", "bf16")
    pure = _plan(capsys, "--precision", "bf16-pure")
    for rank in range(2):
        full, mixed, half = (plan["choice"]["memory"][rank] for plan in (fp32, bf16, pure))
        assert full["casts"] == 0 == half["casts"]
        # fp32 weights, gradients and moments under autocast, and 16-bit copies of its products' weights.
        assert mixed["weights"] == full["weights"] and mixed["optimizer"] == full["optimizer"]
        assert 0 < mixed["casts"] < mixed["weights"] // 2
        assert mixed["activations"] < full["activations"]
        assert half["weights"] * 2 == full["weights"] and half["optimizer"] == 6 * half["weights"]
    # The last rank holds the head (64 x 256 values) and a block's linears (weights and biases).
    assert bf16["choice"]["memory"][1]["casts"] % 2 == 0
    assert bf16["choice"]["memory"][0]["casts"] + bf16["choice"]["memory"][1]["casts"] == 2 * (
        2 * (12 * 64 * 64 + 9 * 64) + 256 * 64)
    assert "--precision bf16" in bf16["train_command"]
    assert bf16["choice"]["step_time"] > 0 and load_hardware("a100-80gb").memory_bandwidth > 0


def test_a_dtype_that_disagrees_with_the_precision_is_refused(capsys):
    assert main([*GPT, "--precision", "bf16", "--dtype", "fp32"]) == 2
    assert "--dtype fp32 and --precision bf16 (computing in bf16) disagree" in capsys.readouterr().err
