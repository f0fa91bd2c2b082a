"""`pipefold plan` end to end through the real parser."""

import json

import pytest

from pipefold.cli.main import main
from pipefold.plan import LayerCost, ModelCosts

GPT = ["plan", "--model", "gpt", "--ranks", "2", "--batch-size", "8"]


def test_json_plan_for_the_builtin_gpt(capsys):
    assert main([*GPT, "--memory", "64MiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory_limit"] == 64 * 2**20
    assert max(out["peak_memory"]) <= 64 * 2**20
    assert out["choice"]["num_ranks"] == 2
    assert "estimate" in out["source"]
    assert len(out["families"]) == 13


def test_table_and_explanation(capsys):
    assert main([*GPT, "--memory", "64MiB", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "top 3 of p=2" in out and "choice:" in out and "schedules:" in out
    assert "not a measurement" in out


def test_costs_file_and_pins(tmp_path, capsys):
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1000, output_bytes=100,
                      parameter_bytes=500)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(ModelCosts(layers=(layer,) * 6, overhead_s=0.5).to_json()))
    assert main(["plan", "--costs", str(path), "--ranks", "2", "--batch", "8", "--schedule", "1f1b",
                 "--microbatches", "4", "--memory", "20000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["choice"]["schedule"], out["choice"]["num_microbatches"]) == ("1f1b", 4)


def test_the_table_and_explanation_say_the_activations_held_where_they_are_priced(tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table's columns unfolded
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1000, output_bytes=100,
                      parameter_bytes=500)
    path = tmp_path / "costs.json"
    words = ["plan", "--costs", str(path), "--ranks", "2", "--batch", "8", "--schedule", "gpipe",
             "--microbatches", "4", "--order-search", "0"]
    path.write_text(json.dumps(ModelCosts(layers=(layer,) * 6).to_json()))
    assert main(words) == 0
    plain = capsys.readouterr().out
    assert "activations held" not in plain and "held F" not in plain
    # 0.01% per byte beyond 1000: each rank holds 4 micro-batches of 2 rows of 3 layers (24000
    # bytes), F +230%, B +115%.
    held = ModelCosts(layers=(layer,) * 6, held_forward_per_byte=1e-4, held_backward_per_byte=5e-5,
                      held_reference_bytes=1000.0)
    path.write_text(json.dumps(held.to_json()))
    assert main(words) == 0
    out = capsys.readouterr().out
    assert "held F (rank)" in out and "+230.0% (0)" in out
    assert "activations held: +230.0% F, +115.0% B on rank 0; +230.0% F, +115.0% B on rank 1" in out


def test_infeasible_limit_is_a_clear_error(capsys):
    assert main([*GPT, "--memory", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert "pipefold plan: error: no configuration fits the memory limit of 1 KiB" in err
    assert "raise the limit to at least" in err


@pytest.mark.parametrize(("flag", "value"), [("--memory", "8G"), ("--memory", "lots"), ("--flops", "-3")])
def test_bad_values_are_refused_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit):
        main([*GPT, flag, value])
    assert f"argument {flag}: {flag} = '{value}'" in capsys.readouterr().err


def test_bad_pin_is_a_clear_error(capsys):
    assert main([*GPT, "--microbatches", "3"]) == 2
    assert "microbatches = 3 does not divide the global batch 8" in capsys.readouterr().err


def test_ranks_sharing_cores_are_planned_with_their_share(capsys):
    """Two ranks on one core cannot beat one rank's work: the plan's step says so."""
    assert main([*GPT, "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)["choice"]
    assert main([*GPT, "--cores", "1", "--json"]) == 0
    shared = json.loads(capsys.readouterr().out)["choice"]
    assert shared["step_time"] > alone["step_time"] * 1.4
    assert main([*GPT, "--cores", "0"]) == 2
    assert "num_cores = 0" in capsys.readouterr().err
