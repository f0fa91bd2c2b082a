"""`pipefold plan --profile --measure-top K`: the top K trained with pipefold train, the measured
fastest reported beside the forecast (one small case: two 2-rank runs of a tiny GPT), and its
bad input refused before anything runs."""

import argparse
import json
import shlex

import pytest

from pipefold.cli import train as train_cli
from pipefold.cli.main import main

TINY = ["--num-layers", "2", "--d-model", "32", "--num-heads", "2", "--seq-len", "16", "--batch-size", "4",
        "--ranks", "2", "--order-search", "0", "--repeats", "1", "--device", "cpu",
        "--calibrate-steps", "0"]


def test_measure_top_trains_the_top_and_runs_the_measured_fastest(capsys):
    argv = ["plan", "--profile", *TINY, "--top", "2", "--measure-top", "2", "--measure-steps", "3",
            "--measure-rounds", "1", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    measured = result["measured"]
    assert [m["rank"] for m in measured] == [1, 2]
    for m, candidate in zip(measured, result["top"], strict=True):
        assert m["forecast_s"] == candidate["step_time"]  # the forecast stays the model's own
        assert m["measured_s"] > 0 and len(m["rounds_s"]) == 1
    fastest = min(measured, key=lambda m: m["measured_s"])
    assert result["measured_fastest"] == fastest["rank"]
    assert result["choice"] == result["top"][0]  # the plan's choice is unchanged
    # The command printed to run is the measured fastest's configuration.
    words = shlex.split(result["train_command"])
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    config = train_cli.config_from_args(parser.parse_args(words[1:]))
    picked = result["top"][fastest["rank"] - 1]
    assert (config.schedule.name, config.schedule.num_microbatches) == (
        picked["schedule"], picked["num_microbatches"])
    assert list(config.partition) == picked["pipeline_kwargs"]["partition"]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--measure-steps", "2"], "--measure-steps = 2"),
        (["--measure-rounds", "0"], "--measure-rounds = 0"),
        (["--measure-top", "-1"], "--measure-top = -1"),
    ],
)
def test_measure_flags_are_refused_before_anything_runs(capsys, extra, match):
    assert main(["plan", "--model", "gpt", *TINY, "--measure-top", "2", *extra]) == 2
    assert f"pipefold plan: error: {match}" in capsys.readouterr().err


def test_measure_top_refuses_a_costs_file(capsys, tmp_path):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"layers": [{"forward_s": 1.0, "backward_s": 2.0, "activation_bytes": 8,
                                             "output_bytes": 8}] * 2}))
    argv = ["plan", "--costs", str(costs), "--ranks", "2", "--batch-size", "4", "--measure-top", "2"]
    assert main(argv) == 2
    assert "--measure-top trains the planned model" in capsys.readouterr().err
