"""`pipefold profile` and `pipefold plan --profile` end to end through the real parser, on a tiny GPT."""

import json

import pytest
import torch

from pipefold.cli.main import main
from pipefold.plan import ModelCosts

MODEL = ["--num-layers", "2", "--d-model", "16", "--num-heads", "2", "--seq-len", "8", "--batch-size", "4"]
TINY = [*MODEL, "--microbatches", "2", "--repeats", "2", "--device", "cpu"]
NUM_LAYERS = 2 + 4  # embedding, positions, 2 blocks, final norm, head
BLOCK_PARAMETER_BYTES = (12 * 16 * 16 + 13 * 16) * 4


@pytest.fixture(scope="module")
def costs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "costs.json"
    assert main(["profile", *TINY, "--out", str(path)]) == 0
    return path


def test_costs_json_round_trips_into_model_costs(costs_file):
    data = json.loads(costs_file.read_text())
    costs = ModelCosts.from_json(costs_file)
    assert costs.to_json() == data
    assert costs.num_layers == NUM_LAYERS
    assert costs.reference_rows == 2  # batch 4 in 2 micro-batches
    assert costs.input_bytes == 2 * 8 * 8  # int64 token ids
    assert costs.source.startswith("measured on cpu, 1 thread(s), median of 2: GPT (layers=2, d_model=16")
    assert [layer.parameter_bytes for layer in costs.layers[2:4]] == [BLOCK_PARAMETER_BYTES] * 2
    assert costs.layers[0].parameter_bytes == costs.layers[-1].parameter_bytes == 256 * 16 * 4  # tied
    assert costs.tied_layers == ((0, NUM_LAYERS - 1),)  # what full sharding gathers as one unit
    assert all(layer.output_bytes == 2 * 8 * 16 * 4 for layer in costs.layers[:-1])


def test_each_backward_is_split_by_its_measured_share(costs_file):
    costs = ModelCosts.from_json(costs_file)
    for layer in costs.layers:
        # A tiny layer's time may be all fixed per call (pipefold.plan.calibrate): 0 per row.
        assert layer.forward_s + layer.fixed_s > 0 and layer.backward_s + layer.fixed_s > 0
        assert layer.weight_grad_s is not None and 0 <= layer.weight_grad_s <= layer.backward_s
    # The planner gets each layer's own share, not the default half.
    shares = {round(layer.weight_s / layer.backward_s, 6) for layer in costs.layers if layer.backward_s > 0}
    assert len(shares) > 1


def test_profile_prices_fixed_costs_runtime_and_update(costs_file):
    costs = ModelCosts.from_json(costs_file)
    assert "fixed cost per call fitted against 1 row" in costs.source
    assert any(layer.fixed_s > 0 for layer in costs.layers)  # a block's torch calls cost at any rows
    assert costs.action_overhead_s >= 0
    assert costs.update_s_per_parameter_byte > 0


def test_plan_accepts_the_measured_costs(costs_file, capsys):
    assert main(["plan", "--costs", str(costs_file), "--ranks", "2", "--batch-size", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["choice"]["num_ranks"] == 2
    assert out["source"].startswith("measured on cpu")


def test_table_shows_f_b_i_w_and_memory_per_layer_and_totals(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich folds cells to the terminal width; keep names whole
    threads = torch.get_num_threads()
    assert main(["profile", *TINY]) == 0
    assert torch.get_num_threads() == threads  # --threads' default 1 is undone afterwards
    out = capsys.readouterr().out
    for text in ("F ms", "B ms", "I ms", "W ms", "W share", "act MiB", "param MiB", "DecoderBlock",
                 "tied_head (tied 'embed')", "total", "x B: the split's own cost"):
        assert text in out


def test_json_prints_the_costs(capsys):
    assert main(["profile", *TINY, "--repeats", "1", "--json", "--rows", "3"]) == 0
    costs = ModelCosts.from_json(json.loads(capsys.readouterr().out))
    assert costs.reference_rows == 3
    assert costs.input_bytes == 3 * 8 * 8


def test_untied_head_is_a_layer_of_its_own(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["profile", *TINY, "--repeats", "1", "--untied"]) == 0
    out = capsys.readouterr().out
    assert "LMHead" in out and "tied_head" not in out


@pytest.mark.parametrize("source", [["--profile"], ["--model", "gpt", "--measure"]])
def test_plan_profiles_then_plans_in_one_command(tmp_path, capsys, source):
    saved = tmp_path / "measured.json"
    argv = ["plan", *source, *MODEL, "--repeats", "1", "--device", "cpu", "--ranks", "2",
            "--save-costs", str(saved), "--json", "--calibrate-steps", "0"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)  # --json: one object, no table
    assert out["source"].startswith("measured on cpu")
    saved_costs = ModelCosts.from_json(saved)
    assert saved_costs.num_layers == NUM_LAYERS
    # Rows default to pipefold train's 8 micro-batches, capped at the batch of 4: one row each.
    assert saved_costs.reference_rows == 1


def test_plan_profile_prints_the_table_then_the_plan(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["plan", "--profile", *MODEL, "--microbatches", "2", "--repeats", "1", "--device", "cpu",
                 "--ranks", "2", "--calibrate-steps", "0"]) == 0
    out = capsys.readouterr().out
    assert out.index("W ms") < out.index("choice:")
    assert "micro-batch of 2 x 8 tokens" in out


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--d-model", "0", "--d-model = 0; give an integer >= 1"),
        ("--num-layers", "-1", "--num-layers = -1"),
        ("--repeats", "0", "--repeats = 0"),
        ("--threads", "0", "--threads = 0"),
        ("--rows", "0", "--rows = 0"),
        ("--num-heads", "3", "--num-heads = 3 does not divide --d-model = 16"),
        ("--microbatches", "5", "--microbatches = 5 exceeds --batch-size = 4"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(capsys, flag, value, message):
    assert main(["profile", *TINY, flag, value]) == 2
    assert f"pipefold profile: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"), [("--device", "tpu"), ("--d-model", "wide"), ("--repeats", "1.5")]
)
def test_malformed_flags_are_refused_by_the_parser(capsys, flag, value):
    with pytest.raises(SystemExit):
        main(["profile", *TINY, flag, value])
    assert f"argument {flag}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_without_a_device_is_refused(capsys):
    assert main(["profile", *MODEL, "--device", "cuda"]) == 2
    assert "--device = 'cuda' but torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--profile", "--flops", "1e14"], "--flops shapes the FLOP estimate"),
        (["--profile", "--bytes-per-value", "2"], "--bytes-per-value shapes the FLOP estimate"),
        (["--model", "gpt", "--measure", "--overhead", "1e-5"], "--overhead shapes the FLOP estimate"),
        (["--model", "gpt", "--save-costs", "x.json"], "--save-costs writes measured costs"),
        (["--costs", "x.json", "--measure"], "--measure goes with --model gpt"),
        (["--profile", "--repeats", "0"], "--repeats = 0"),
    ],
)
def test_plan_refuses_flags_that_do_not_fit_a_measurement(capsys, argv, message):
    assert main(["plan", *argv, *MODEL, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err
