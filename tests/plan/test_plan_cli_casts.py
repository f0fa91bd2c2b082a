"""`pipefold plan --model gpt --precision P` without --profile or --hardware: the FLOP estimate times
autocast's weight casts at a memory bandwidth it states (one process, through the real parser)."""

import json
from dataclasses import replace

import pytest

from pipefold.cli.main import build_parser, main
from pipefold.cli.plan import _costs
from pipefold.plan.evaluate import evaluate
from pipefold.plan.hardware import load_hardware
from pipefold.plan.space import Config
from pipefold.simulate import Link

SIZES = ["--num-layers", "2", "--d-model", "32", "--num-heads", "2", "--seq-len", "16", "--vocab-size", "64"]
PLAN = ["plan", "--model", "gpt", *SIZES, "--ranks", "2", "--batch-size", "8", "--schedule", "1f1b",
        "--microbatches", "4", "--recompute", "none", "--order-search", "0"]
# The blocks' four linears (weights and biases) and the head: what autocast casts.
CAST_ELEMENTS = 2 * (12 * 32 * 32 + 9 * 32) + 64 * 32


def _estimate(*extra):
    args = build_parser().parse_args([*PLAN, *extra])
    return _costs(args)


def _cast_seconds(costs):
    return costs.cast_s_per_parameter_byte * costs.parameter_bytes


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_casts_take_time_at_the_cpu_presets_bandwidth_by_default(precision):
    costs = _estimate("--precision", precision)
    bandwidth = load_hardware("cpu").memory_bandwidth
    assert sum(layer.cast_bytes for layer in costs.layers) == 2 * CAST_ELEMENTS
    # Read each fp32 weight (4 bytes), write its 16-bit copy (2): 6 bytes an element.
    assert _cast_seconds(costs) == pytest.approx(CAST_ELEMENTS * 6 / bandwidth)
    assert f"weight casts at {bandwidth:.3g} B/s (the cpu preset's" in costs.source
    # The plan adds them once to the step (the casts are held for it).
    config, bounds = Config("1f1b", 1, 4, 1), (0, 3, 6)
    timed = evaluate(costs, config, 2, bounds, (), Link())
    untimed = evaluate(replace(costs, cast_s_per_parameter_byte=0.0), config, 2, bounds, (), Link())
    assert timed.step_time - untimed.step_time == pytest.approx(CAST_ELEMENTS * 6 / bandwidth)


def test_the_given_bandwidth_times_them_and_the_plan_says_so(capsys):
    costs = _estimate("--precision", "bf16", "--memory-bandwidth", "3e11")
    assert _cast_seconds(costs) == pytest.approx(CAST_ELEMENTS * 6 / 3e11)
    assert main([*PLAN, "--precision", "bf16", "--memory-bandwidth", "3e11", "--json"]) == 0
    assert "weight casts at 3e+11 B/s (--memory-bandwidth)" in json.loads(capsys.readouterr().out)["source"]


@pytest.mark.parametrize("precision", ["fp32", "bf16-pure"])
def test_no_casts_no_time(precision):
    costs = _estimate("--precision", precision)
    assert _cast_seconds(costs) == 0 and not any(layer.cast_bytes for layer in costs.layers)
    assert "weight casts" not in costs.source


@pytest.mark.parametrize("extra, words", [
    (["--hardware", "cpu"], "--memory-bandwidth and --hardware both say how fast"),
    (["--costs", "costs.json"], "a --costs file prices them itself"),
])
def test_a_bandwidth_where_it_does_not_apply_is_refused(capsys, tmp_path, extra, words):
    from pipefold.plan import gpt_costs

    path = tmp_path / "costs.json"
    path.write_text(json.dumps(gpt_costs(num_layers=2, d_model=32, num_heads=2, seq_len=16).to_json()))
    extra = [str(path) if word == "costs.json" else word for word in extra]
    argv = [*PLAN, "--precision", "bf16", *extra, "--memory-bandwidth", "1e10"]
    if "--costs" in extra:
        argv = [word for word in argv if word not in ("--model", "gpt")]
    assert main(argv) == 2
    assert words in capsys.readouterr().err


def test_a_non_positive_bandwidth_is_refused(capsys):
    with pytest.raises(SystemExit):
        main([*PLAN, "--precision", "bf16", "--memory-bandwidth", "0"])
    assert "--memory-bandwidth = '0'; give a positive number" in capsys.readouterr().err
