"""`pipefold plan` prints the `pipefold train` command that runs its choice; that command
parses into exactly the planned configuration, and one of them trains."""

import argparse
import json
import shlex

import pytest

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.schedule.registry import family

GPT = ["--num-layers", "4", "--d-model", "64", "--num-heads", "4", "--seq-len", "32"]


def _plan(capsys, *argv):
    assert main(["plan", "--model", "gpt", *GPT, "--order-search", "0", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _train_config(command):
    words = shlex.split(command)
    assert words[:2] == ["pipefold", "train"]
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(words[1:]))


@pytest.mark.parametrize(
    "argv",
    [
        ["--ranks", "2", "--batch-size", "16"],
        ["--ranks", "2", "--tensor-parallel", "2", "--batch-size", "8"],
        ["--devices", "4", "--batch-size", "16", "--max-tensor-parallel", "2", "--tp-bandwidth", "1e15",
         "--bandwidth", "1e9"],
        ["--ranks", "2", "--batch-size", "16", "--memory", "2.2MiB"],  # recomputes stages 0-2
        ["--ranks", "2", "--batch-size", "16", "--allow-async", "--schedule", "pipedream"],
        ["--ranks", "2", "--data-parallel", "2", "--batch-size", "16", "--zero"],
        ["--ranks", "2", "--tensor-parallel", "2", "--batch-size", "8", "--sequence-parallel"],
    ],
    ids=["pipeline", "tp-pinned", "dp-pp-tp-searched", "recompute", "async", "zero", "sequence-parallel"],
)
def test_the_printed_command_is_the_planned_configuration(capsys, argv):
    result = _plan(capsys, *argv)
    choice = result["choice"]
    config = _train_config(result["train_command"])
    s = config.schedule
    assert (s.name, s.ranks, s.num_microbatches) == (
        choice["schedule"], choice["num_ranks"], choice["num_microbatches"]
    )
    assert (s.num_virtual or family(s.name).default_virtual) == choice["num_virtual"]
    assert (s.data_parallel, s.tensor_parallel) == (
        choice["num_data_parallel"], choice["num_tensor_parallel"]
    )
    assert config.batch_size == result["global_batch"]
    assert list(config.partition) == choice["pipeline_kwargs"]["partition"]
    recompute = choice["pipeline_kwargs"]["recompute"]
    assert (config.recompute if recompute == "none" else list(config.recompute)) == recompute
    if "--memory" in argv:
        assert recompute != "none"  # the case is there to carry a recompute list
    assert (config.model.num_layers, config.model.d_model, config.model.num_heads) == (4, 64, 4)
    assert config.optimizer.zero is choice["sharded_optimizer"] is ("--zero" in argv)
    assert s.sequence_parallel is choice["sequence_parallel"] is ("--sequence-parallel" in argv)


def test_no_command_for_a_costs_file(capsys, tmp_path):
    from pipefold.plan import gpt_costs

    path = tmp_path / "costs.json"
    path.write_text(json.dumps(gpt_costs(num_layers=2, d_model=32, num_heads=2, seq_len=16).to_json()))
    assert main(["plan", "--costs", str(path), "--ranks", "2", "--order-search", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_command"] is None


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_a_planned_tp_configuration_trains(tmp_path, capfd):
    """Plan a tiny GPT over pp=2 x tp=2 with sequence parallelism, then run the printed command
    for two steps."""
    tiny = ["--num-layers", "2", "--d-model", "32", "--num-heads", "2", "--seq-len", "32"]
    assert main(["plan", "--model", "gpt", *tiny, "--ranks", "2", "--tensor-parallel", "2",
                 "--sequence-parallel", "--batch-size", "8", "--schedule", "1f1b", "--order-search", "0",
                 "--json"]) == 0
    result = json.loads(capfd.readouterr().out)
    out = tmp_path / "run"
    words = shlex.split(result["train_command"])[1:] + [
        "--steps", "2", "--out", str(out), "--set", "data.max_bytes=100000", "--set", "sample_tokens=0",
        "--device", "cpu",
    ]
    assert main(words) == 0, capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["schedule"]["tensor_parallel"] == 2
    assert summary["config"]["schedule"]["sequence_parallel"] is True
    assert summary["config"]["partition"] == result["choice"]["pipeline_kwargs"]["partition"]
    assert len(summary["losses"]) == 2
