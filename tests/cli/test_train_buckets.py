"""`pipefold train --bucket-by-length`: each step a batch of corpus lines of one bucket length."""

from __future__ import annotations

import argparse
import json

import pytest

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.errors import ConfigError


def _config(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(["train", *argv]))


def test_the_flag_reaches_the_config():
    config = _config(["--bucket-by-length", "--set", "data.bucket_min_len=16"])
    assert config.data.bucket_by_length and config.data.bucket_min_len == 16
    assert not _config([]).data.bucket_by_length


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tensor-parallel", "2", "--sequence-parallel"], "drop --sequence-parallel or --bucket-by-length"),
        (["--seq-len", "32", "--set", "data.bucket_min_len=64"], "data.bucket_min_len=64"),
        (["--set", "data.bucket_min_len=0"], "data.bucket_min_len=0"),
    ],
)
def test_refusals(argv, message):
    with pytest.raises(ConfigError, match=message):
        _config(["--bucket-by-length", *argv])


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_steps_of_different_lengths_train_and_report(tmp_path, capfd):
    """Four steps of a tiny GPT on 2 ranks: the steps carry different token counts (bucket
    lengths), and the report, metrics and timeline cope with them."""
    out = tmp_path / "run"
    code = main([
        "train", "--steps", "4", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
        "--seq-len", "64", "--batch-size", "8", "--microbatches", "2", "--set", "data.max_bytes=100000",
        "--set", "sample_tokens=0", "--device", "cpu", "--bucket-by-length", "--seed", "1", "--out", str(out),
    ])
    assert code == 0, capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["losses"]) == 4 and all(0 < loss < 10 for loss in summary["losses"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lengths = [row["seq_len"] for row in rows]
    assert len(set(lengths)) > 1 and set(lengths) <= {8, 16, 32, 64}, lengths
    assert lengths == summary["seq_len_steps"]
    # A bucket of length L takes 512 // L rows (a multiple of 2 micro-batches): 512 tokens a step.
    assert [round(row["tokens_per_s"] * row["step_time_s"]) for row in rows] == [512] * 4
    assert summary["tokens_per_s"] > 0 and (out / "timeline.png").is_file()
