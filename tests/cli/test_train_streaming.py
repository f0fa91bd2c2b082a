"""`pipefold train --streaming`: steps of pipedream-2bw overlap in streams that drain before each
checkpoint; a run resumed from that checkpoint refills and goes on as the uninterrupted one."""

import json

import pytest

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.job.config import load_config

TINY = [
    "--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--seq-len", "32", "--batch-size", "8",
    "--microbatches", "4", "--set", "data.max_bytes=100000", "--set", "sample_tokens=0", "--device", "cpu",
    # Dropout draws from each rank's generator: resuming is exact only with the states restored.
    "--dropout", "0.1", "--schedule", "pipedream-2bw", "--streaming",
]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"schedule.streaming": True}, "schedule.streaming=True is not allowed: schedule.name='1f1b' cannot"),
        (
            {"schedule.streaming": True, "schedule.name": "pipedream", "data.bucket_by_length": True},
            "data.bucket_by_length=True is not allowed: a stream (schedule.streaming) runs every step",
        ),
    ],
)
def test_streaming_refusals_come_before_any_rank_starts(overrides, words):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides=overrides)
    assert words in str(caught.value)


def test_streams_end_at_checkpoints_evaluations_and_the_end():
    from types import SimpleNamespace

    from pipefold.job.streaming import MAX_STREAM_STEPS, Streams

    config = SimpleNamespace(steps=120, checkpoint_every=30, eval_every=0)
    streams = Streams(SimpleNamespace(config=config), stops=(None, 7))  # type: ignore[arg-type]
    assert [streams.end_of(step) for step in (0, 7, 29, 30, 60, 90)] == [7, 30, 30, 60, 90, 120]
    config.checkpoint_every = 0
    assert streams.end_of(10) == 10 + MAX_STREAM_STEPS
    config.eval_every = 4
    assert streams.end_of(10) == 12


@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_a_streaming_run_resumed_at_its_checkpoint_goes_on_as_the_uninterrupted_one(tmp_path, capfd):
    """Three runs of 2 ranks: 4 steps (two streams of 2 steps, a checkpoint between them); 2 steps;
    those 2 steps resumed to 4. The asynchronous AdamW keeps a constant learning rate, so the
    2-step run is the first stream of the 4-step one."""
    def run(out, *extra):
        code = main(["train", *TINY, "--checkpoint-every", "2", "--out", str(tmp_path / out), *extra])
        assert code == 0, capfd.readouterr().err
        return json.loads((tmp_path / out / "summary.json").read_text())

    straight = run("straight", "--steps", "4")
    assert straight["stream_steps_last"] == 2
    first = run("first", "--steps", "2")
    assert first["losses"] == straight["losses"][:2]
    resumed = run("resumed", "--steps", "4", "--resume", str(tmp_path / "first" / "checkpoint"))
    assert resumed["start_step"] == 2
    assert resumed["losses"] == straight["losses"][2:]


@pytest.mark.multiprocess
@pytest.mark.timeout(200)
def test_a_bf16_pure_stream_keeps_bf16_weights_and_fp32_masters_in_its_checkpoint(tmp_path, capfd):
    """`--precision bf16-pure --streaming` (2 ranks, 2 steps): the stages' weights are bf16 and
    each stage's AdamW keeps an fp32 master of every one of them, as its checkpoint records (the
    per-update exactness: tests/runtime/test_runtime_exact.py, bf16 weights streaming)."""
    out = tmp_path / "pure"
    code = main([
        "train", *TINY, "--precision", "bf16-pure", "--steps", "2", "--checkpoint-every", "2",
        "--eval-every", "0", "--out", str(out),
    ])
    assert code == 0, capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["losses"]) == 2 and all(loss == loss for loss in summary["losses"])
    meta = json.loads((out / "checkpoint" / "pipefold.json").read_text())
    assert {entry["dtype"] for entry in meta["model"].values()} == {"bfloat16"}
    state = meta["optimizer"]["state"]
    assert set(state) == set(meta["model"])
    for name, entry in state.items():
        master = entry["master"]
        assert master["dtype"] == "float32" and master["shape"] == meta["model"][name]["shape"], name
        assert entry["exp_avg"]["dtype"] == "float32", name
