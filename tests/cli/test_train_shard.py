"""`pipefold train --shard {replicate,zero1,full}`: the flag reaches the job, full sharding trains
as the whole model does and each replica holds half of the weights and AdamW's state."""

import json

import pytest

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.job.config import load_config

_TINY = (
    "train", "--steps", "3", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
    "--seq-len", "32", "--batch-size", "8", "--microbatches", "2", "--set", "data.max_bytes=100000",
    "--set", "sample_tokens=0", "--device", "cpu", "--ranks", "1",
)


def test_shard_is_a_config_field_and_zero_stays_its_alias():
    assert load_config(
        overrides={"schedule.shard": "zero1", "schedule.data_parallel": 2}
    ).schedule.shard == "zero1"
    with pytest.raises(
        ConfigError, match=r"schedule.shard='full' is not allowed: .*\(schedule.data_parallel=1\)"
    ):
        load_config(overrides={"schedule.shard": "full"})
    # The GPT's tied embedding and head, and fp16's loss scale, compose with it.
    tied = load_config(overrides={"schedule.shard": "full", "schedule.data_parallel": 2, "precision": "fp16"})
    assert tied.model.tie_embeddings and tied.schedule.shard == "full"
    with pytest.raises(
        ConfigError, match=r"full sharding already shards the optimizer state .*; drop optimizer.zero"
    ):
        load_config(overrides={
            "schedule.shard": "full", "schedule.data_parallel": 2, "optimizer.zero": True,
        })


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_train_fully_sharded_trains_as_one_process_on_half_the_memory(tmp_path, capfd):
    summaries = {}
    # zb-v puts the GPT's tied embedding and head on the one pipeline rank: one FSDP unit.
    full = ["--data-parallel", "2", "--shard", "full", "--gather-lookahead", "1", "--schedule", "zb-v"]
    for name, extra in {"one": [], "full": full}.items():
        out = tmp_path / name
        assert main([*_TINY, *extra, "--out", str(out)]) == 0, capfd.readouterr().err
        summaries[name] = json.loads((out / "summary.json").read_text())
    assert summaries["full"]["config"]["schedule"]["shard"] == "full"
    assert summaries["full"]["losses"] == pytest.approx(summaries["one"]["losses"], rel=1e-4)
    whole = summaries["one"]["memory"][0]
    halves = [m for m in summaries["full"]["memory"]]
    assert len(halves) == 2
    for key in ("weights", "optimizer"):
        # Each replica holds its half (Shard(0) rows: within a few rows of exactly half).
        assert sum(m[key] for m in halves) == whole[key] and all(m[key] < 0.6 * whole[key] for m in halves)


def test_gather_options_are_config_fields_and_flags_that_need_full_sharding():
    import argparse

    from pipefold.cli.train import add_parser, config_from_args

    full = {"schedule.shard": "full", "schedule.data_parallel": 2}
    config = load_config(
        overrides={**full, "schedule.gather_lookahead": 2, "schedule.free_between_microbatches": True}
    )
    assert (config.schedule.gather_lookahead, config.schedule.free_between_microbatches) == (2, True)
    with pytest.raises(
        ConfigError, match=r"schedule.gather_lookahead=2 is not allowed: .*schedule.shard='full'"
    ):
        load_config(overrides={"schedule.gather_lookahead": 2})
    with pytest.raises(ConfigError, match=r"schedule.free_between_microbatches=True is not allowed"):
        load_config(overrides={"schedule.free_between_microbatches": True})
    with pytest.raises(
        ConfigError, match=r"schedule.gather_lookahead=-1 is not allowed: give an integer >= 0"
    ):
        load_config(overrides={**full, "schedule.gather_lookahead": -1})
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args([
        "train", "--data-parallel", "2", "--shard", "full", "--gather-lookahead", "1",
        "--free-between-microbatches",
    ])
    schedule = config_from_args(args).schedule
    assert (schedule.gather_lookahead, schedule.free_between_microbatches) == (1, True)
