"""`pipefold train --resume` and `--max-restarts`: a run continued from its checkpoint, by hand or
after a rank was killed, has the losses of an uninterrupted one, dropout included."""

import json
import random

import numpy as np
import pytest
import torch

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.data import BatchSampler
from pipefold.errors import ConfigError
from pipefold.job.config import load_config
from pipefold.job.recovery import FAULT_ENV, RESTART_ENV, exit_step, resume_after_restart
from pipefold.job.rng import capture_rng_state, set_rng_state
from pipefold.job.setup import check_resume
from pipefold.model.zoo import gpt_layers
from pipefold.model.zoo.gpt import GPT

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
    # Dropout draws from each rank's torch generator: resuming is exact only with the random
    # states restored from the checkpoint.
    "--dropout",
    "0.1",
]


def _train(capfd, out, *extra):
    code = main(["train", *TINY, "--out", str(out), *extra])
    assert code == 0, capfd.readouterr().err
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 4-step run the others are compared with."""
    out = tmp_path_factory.mktemp("straight")
    assert main(["train", *TINY, "--out", str(out), "--steps", "4"]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_resume_continues_the_loss_of_an_uninterrupted_run(tmp_path, capfd, straight):
    # Saved in the background: the second save waits for the first, the run's end for the second.
    first = _train(capfd, tmp_path / "first", "--steps", "2", "--checkpoint-every", "1", "--async-checkpoint")
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
    states = meta["extra"]["rng"]
    assert len(states) == 2 and {"python", "numpy", "torch", "sampler"} <= set(states[1])


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_a_killed_rank_is_restarted_from_the_latest_checkpoint(
    tmp_path, capfd, caplog, monkeypatch, straight
):
    # Rank 1 dies by SIGKILL before step 3 (0-based): steps 0-2 ran, the checkpoint is of step 2,
    # so the restart repeats step 2 and must give the uninterrupted run's losses from there on.
    monkeypatch.setenv(FAULT_ENV, "1:3")
    out = tmp_path / "restarted"
    recovered = _train(capfd, out, "--steps", "4", "--checkpoint-every", "2", "--max-restarts", "1")
    # The launcher logs the restart, naming the killed rank (by the signal, or as the rank its
    # peers blame).
    restarts = [r.getMessage() for r in caplog.records if "restarting all ranks" in r.getMessage()]
    assert len(restarts) == 1 and "rank 1" in restarts[0] and "(1 of 1)" in restarts[0], restarts
    assert recovered["start_step"] == 2
    assert recovered["losses"] == pytest.approx(straight["losses"][2:], rel=1e-5)
    assert json.loads((out / "checkpoint" / "pipefold.json").read_text())["step"] == 4


def test_random_states_round_trip_through_json_and_give_the_same_dropout():
    layers = gpt_layers(256, 16, 2, 1, 8, dropout=0.5)
    model = GPT(layers)
    model.train()
    sampler = BatchSampler(bytes(range(256)) * 4, batch_size=2, seq_len=8, seed=3)
    ids = torch.randint(0, 256, (2, 8))
    saved = json.loads(json.dumps(capture_rng_state(sampler, torch.device("cpu"))))
    first = (model(ids), random.random(), np.random.rand(), sampler.next_batch()[0])
    second = (model(ids), random.random(), np.random.rand(), sampler.next_batch()[0])
    assert not torch.equal(first[0], second[0])  # dropout is on: the masks differ step to step
    set_rng_state(saved, sampler, torch.device("cpu"))
    again = (model(ids), random.random(), np.random.rand(), sampler.next_batch()[0])
    torch.testing.assert_close(again[0], first[0], rtol=0, atol=0)
    assert again[1:3] == first[1:3] and torch.equal(again[3], first[3])


def test_dropout_zero_keeps_the_gpt_unchanged_and_bad_values_are_refused():
    plain = gpt_layers(256, 16, 2, 1, 8)
    assert plain[2].args == gpt_layers(256, 16, 2, 1, 8, dropout=0.0)[2].args
    assert sorted(GPT(plain).state_dict()) == sorted(
        GPT(gpt_layers(256, 16, 2, 1, 8, dropout=0.2)).state_dict()
    )
    with pytest.raises(ConfigError, match="dropout"):
        gpt_layers(256, 16, 2, 1, 8, dropout=1.0)
    with pytest.raises(ConfigError, match="model.dropout=-0.1"):
        load_config(overrides={"model.dropout": -0.1})
    assert _parse(["--dropout", "0.1"]).model.dropout == 0.1


def test_async_checkpoint_flag_also_with_data_parallelism():
    assert _parse(["--async-checkpoint"]).async_checkpoint is True
    # Background saves coordinate replicas and shards like synchronous ones (tests/runtime/test_zero.py).
    assert _parse(["--async-checkpoint", "--data-parallel", "2"]).async_checkpoint is True


def test_max_restarts_needs_checkpoints_and_a_restart_resumes_from_out(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="max_restarts=2.*checkpoint_every"):
        _parse(["--max-restarts", "2"])
    with pytest.raises(ConfigError, match="max_restarts=-1"):
        _parse(["--max-restarts", "-1", "--checkpoint-every", "5"])
    config = _parse(["--max-restarts", "2", "--checkpoint-every", "5", "--out", str(tmp_path)])
    monkeypatch.delenv(RESTART_ENV, raising=False)
    assert resume_after_restart(config) is config  # a first attempt
    monkeypatch.setenv(RESTART_ENV, "1")
    assert resume_after_restart(config) is config  # restarted before any save: start over
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "pipefold.json").write_text("{}")
    assert resume_after_restart(config).resume == str(tmp_path / "checkpoint")


def test_the_fault_hook_fires_on_its_rank_in_the_first_attempt_only(monkeypatch):
    monkeypatch.delenv(RESTART_ENV, raising=False)
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert exit_step(0) is None
    monkeypatch.setenv(FAULT_ENV, "1:3")
    assert exit_step(1) == 3 and exit_step(0) is None
    monkeypatch.setenv(RESTART_ENV, "1")
    assert exit_step(1) is None
    monkeypatch.setenv(FAULT_ENV, "bad")
    monkeypatch.setenv(RESTART_ENV, "0")
    with pytest.raises(ConfigError, match=FAULT_ENV):
        exit_step(1)


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
