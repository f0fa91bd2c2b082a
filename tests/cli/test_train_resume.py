"""`pipefold train --resume`: a run continued from its checkpoint has the losses of an uninterrupted one."""

import json

import pytest

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.job.setup import check_resume

TINY = [
    "--d-model",
    "32",
    "--num-layers",
    "2",
    "--num-heads",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--microbatches",
    "4",
    "--set",
    "data.max_bytes=100000",
    "--set",
    "sample_tokens=0",
    "--set",
    "optimizer.warmup_steps=3",
    "--device",
    "cpu",
]


def _train(capfd, out, *extra):
    code = main(["train", *TINY, "--out", str(out), *extra])
    assert code == 0, capfd.readouterr().err
    return json.loads((out / "summary.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_resume_continues_the_loss_of_an_uninterrupted_run(tmp_path, capfd):
    straight = _train(capfd, tmp_path / "straight", "--steps", "4")
    first = _train(capfd, tmp_path / "first", "--steps", "2", "--checkpoint-every", "1")
    resumed = _train(
        capfd, tmp_path / "resumed", "--steps", "4", "--resume", str(tmp_path / "first" / "checkpoint")
    )
    assert first["losses"] == pytest.approx(straight["losses"][:2], rel=1e-6)
    assert resumed["start_step"] == 2
    # The warm-up lr, the AdamW moments and the batch order all continue: the same losses.
    assert resumed["losses"] == pytest.approx(straight["losses"][2:], rel=1e-5)
    assert "resumed from" in capfd.readouterr().out
    meta = json.loads((tmp_path / "resumed" / "checkpoint" / "pipefold.json").read_text())
    assert meta["step"] == 4 and meta["extra"]["config"]["steps"] == 4
    assert sorted(p.name for p in (tmp_path / "first").iterdir() if p.name.startswith(".")) == []


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(["train", *argv]))


def test_checkpoint_flags_reach_the_config(tmp_path):
    config = _parse(["--checkpoint-every", "50", "--resume", "runs/x/checkpoint"])
    assert config.checkpoint_every == 50 and config.resume == "runs/x/checkpoint"
    with pytest.raises(ConfigError, match="checkpoint_every=-1"):
        _parse(["--checkpoint-every", "-1"])


def test_bad_resume_is_refused_before_any_worker_starts(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "resume=" in err and "does not exist" in err
    with pytest.raises(ConfigError, match="does not exist"):
        check_resume(_parse(["--resume", str(tmp_path / "missing")]))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "pipefold.json").write_text(
        json.dumps(
            {
                "format": "pipefold-checkpoint",
                "format_version": 1,
                "pipefold_version": "0",
                "step": 300,
                "extra": None,
                "schedule": "1f1b",
                "num_ranks": 2,
                "partition": [4, 4],
                "model": {},
                "optimizer": {"param_groups": [], "group_of": {}, "state": {}, "scalars": {}},
            }
        )
    )
    with pytest.raises(ConfigError, match="at step 300 but steps=300"):
        check_resume(_parse(["--resume", str(tmp_path / "ckpt")]))
