"""`pipefold train` as an operator meets it: the run directory checked before anything starts,
an earlier run never silently overwritten, on_nonfinite from the CLI, and a run that stops on
an error says so once, naming the step, and still writes summary.json."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from pipefold.cli import train as train_cli
from pipefold.cli.main import EXIT_FAILURE, EXIT_USAGE, main
from pipefold.errors import ConfigError, NonFiniteLoss
from pipefold.job.config import load_config
from pipefold.job.outcome import failure_summary, name_the_step
from pipefold.job.outdir import check_out_dir
from pipefold.job.report import StepStats


def _parse(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(["train", *argv]))


@pytest.mark.parametrize(
    ("out", "message"),
    [("/proc/pipefold-run", "inside /proc, a kernel file system"),
     ("README.md/run", "'README.md' is a file, not a directory")],
)
def test_a_bad_run_directory_is_refused_at_once(out, message, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert main(["train", "--out", out, "--steps", "1"]) == EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_run_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="is not writable"):
        check_out_dir(_parse(["--out", str(locked / "run")]))


def test_an_earlier_run_is_not_overwritten_without_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "pipefold.json").write_text(json.dumps({"step": 40}))
    with pytest.raises(ConfigError, match=r"holds the checkpoint of an earlier run \(at step 40\).*"
                       r"--resume .*checkpoint --steps N with N > 40.*--overwrite"):
        check_out_dir(_parse(["--out", str(out)]))
    check_out_dir(_parse(["--out", str(out), "--overwrite"]))
    check_out_dir(_parse(["--out", str(out), "--resume", str(out / "checkpoint"), "--steps", "50"]))
    check_out_dir(_parse(["--out", str(tmp_path / "fresh")]))
    assert not (tmp_path / "fresh").exists(), "checking creates nothing"


def test_on_nonfinite_from_the_cli_and_the_config():
    assert _parse([]).on_nonfinite == "raise"
    assert _parse(["--on-nonfinite", "skip"]).on_nonfinite == "skip"
    assert load_config(overrides={"on_nonfinite": "skip"}).on_nonfinite == "skip"
    with pytest.raises(ConfigError, match="on_nonfinite='ignore'"):
        load_config(overrides={"on_nonfinite": "ignore"})
    with pytest.raises(ConfigError, match="on_nonfinite"):  # the rulebook: not with asynchronous updates
        load_config(overrides={"on_nonfinite": "skip", "schedule.name": "pipedream",
                               "model.tie_embeddings": False})


def test_the_failure_summary_names_the_error_and_the_step():
    config = load_config(overrides={"out": "runs/x"})
    error = name_the_step(NonFiniteLoss("the loss of micro-batch(es) [1] is nan"), 7)
    assert str(error).startswith("step 7: the loss of micro-batch(es) [1] is nan")
    summary = failure_summary(config, [StepStats(5, 2.5, 0.1, 10.0, 0.2)], 7, error)
    assert summary["status"] == "failed" and summary["error"]["step"] == 7
    assert summary["error"]["type"] == "NonFiniteLoss" and summary["losses"] == [2.5]
    json.dumps(summary)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_a_run_stopped_by_a_nan_says_so_once_and_writes_its_summary(tmp_path, capfd):
    out = tmp_path / "run"
    code = main([
        "train", "--steps", "6", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
        "--seq-len", "32", "--batch-size", "8", "--microbatches", "2", "--set", "data.max_bytes=100000",
        "--set", "sample_tokens=0", "--device", "cpu", "--lr", "1e30", "--set", "optimizer.warmup_steps=0",
        "--out", str(out),
    ])
    err = capfd.readouterr().err
    assert code == EXIT_FAILURE, err
    assert "Traceback" not in err
    assert err.count("the loss of micro-batch") == 1, err
    assert "failed with exit code 1: step 2: the loss of micro-batch(es)" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]["type"] == "NonFiniteLoss"
    assert summary["error"]["step"] == 2 and len(summary["losses"]) == 1
