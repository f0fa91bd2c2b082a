"""The calibration run's sizes and rounds (pure logic, one process): which micro-batch counts
`pipefold plan --profile` measures, how their steps alternate, and what the run refuses."""

import pytest

from pipefold.cli.calibration_run import main
from pipefold.cli.plan_calibrate import (
    SMALL_MICROBATCHES_PER_REFERENCE,
    calibration_microbatches,
    calibration_sizes,
)
from pipefold.errors import ConfigError, ScheduleError
from pipefold.job.calibration import (
    CURVE_FAMILY,
    HELD_FAMILY,
    MAX_ROUNDS,
    SPLIT_FAMILY,
    blocks,
    check_curve,
    check_held,
    check_sizes,
    check_split,
    split_blocks,
)
from pipefold.job.calibration_size import CalibrationSize, format_sizes, parse_sizes
from pipefold.job.config import load_config


def test_calibration_microbatches_halve_while_the_rows_change():
    # The search prices only the profile's rows or more (the most micro-batches it searches: 8).
    assert calibration_microbatches(8, 32, 8) == (8, 4, 2)  # 4, 8 and 16 rows
    assert calibration_microbatches(2, 32, 2) == (2, 1)
    assert calibration_microbatches(1, 32, 1) == (1,)  # one size: the profile's growth with rows kept
    assert calibration_microbatches(5, 5) == (5, 2, 1)  # 1, 3 and 5 rows: none fewer to search


def test_calibration_microbatches_add_fewer_rows_down_to_the_fewest_searched():
    # 4, 8, 16 rows, then 2 and 1: the one-row micro-batch the search prices is measured, not extrapolated.
    assert calibration_microbatches(8, 32) == (8, 4, 2, 16, 32)
    assert calibration_microbatches(8, 32, 16) == (8, 4, 2, 16)  # --max-microbatches 16: 2 rows at fewest
    assert calibration_microbatches(8, 32, 100) == (8, 4, 2, 16, 32)  # capped at the batch
    assert calibration_microbatches(8, 512) == (8, 4, 2, 64, 512)  # 64 rows, then 8 and 1
    assert calibration_microbatches(4, 8) == (4, 2, 1, 8)  # 1 row: no size between 2 and 1


@pytest.mark.parametrize(("args", "field"), [((0, 32), "microbatches = 0"), ((8, -1), "batch_size = -1"),
                                             ((8, 32, 0), "most_microbatches = 0"),
                                             ((True, 32), "microbatches = True")])
def test_calibration_microbatches_refuse_a_count_below_one(args, field):
    with pytest.raises(ConfigError, match=f"calibration {field}; give an integer of 1 or more"):
        calibration_microbatches(*args)


def test_calibration_microbatches_refuse_more_micro_batches_than_samples():
    with pytest.raises(ConfigError, match="microbatches = 16 exceeds batch_size = 8; give at most one"):
        calibration_microbatches(16, 8)


def test_calibration_sizes_are_the_counts_where_the_cap_does_not_bite():
    # 16 and 32 micro-batches at 2 and 1 row run the whole batch of 32, as before the cap.
    assert format_sizes(calibration_sizes(8, 32, None, 2)) == "8,4,2,16,32"
    assert format_sizes(calibration_sizes(8, 16, None, 2)) == "8,4,2,16"
    assert calibration_sizes(8, 32, 8, 2) == tuple(map(CalibrationSize, calibration_microbatches(8, 32, 8)))


@pytest.mark.parametrize("batch_size", [64, 128, 512, 4096, 65536])
def test_calibration_sizes_of_few_rows_run_a_bounded_slice_at_any_batch(batch_size):
    counts = calibration_microbatches(8, batch_size)
    sizes = calibration_sizes(8, batch_size, None, 2)
    cap = SMALL_MICROBATCHES_PER_REFERENCE * 8
    # The same rows per micro-batch as the uncapped counts (the fit's sizes), down to one row ...
    assert [size.microbatch_rows(batch_size) for size in sizes] == [-(-batch_size // c) for c in counts]
    assert sizes[-1].microbatch_rows(batch_size) == 1
    # ... but no size runs more than the cap's micro-batches, nor more rows than the batch.
    assert max(size.num_microbatches for size in sizes) == cap
    assert all(size.step_rows(batch_size) <= batch_size for size in sizes)
    # Sizes of the reference's rows or more run the whole batch, as train runs it.
    assert all(size.sliced_rows is None for size, count in zip(sizes, counts, strict=True) if count <= 8)


def test_calibration_sizes_cap_with_the_ranks_and_within_the_batch():
    # Uncapped: 64 and 512 micro-batches of the whole batch.
    assert format_sizes(calibration_sizes(8, 512, None, 2)) == "8,4,2,32x8,32x1"
    assert format_sizes(calibration_sizes(8, 512, None, 16)) == "8,4,2,64,64x1"  # 4 x 16 ranks
    # 48 micro-batches of 2 rows at a batch of 94, capped to 32 x 2 = 64 rows: within the batch.
    assert calibration_sizes(8, 94, 47, 2)[-1] == CalibrationSize(32, 2)
    # 24 micro-batches of 5 rows (the one between, 3 x 8: not the fewest of 5 rows, 20) on 5 ranks
    # capped at 20: 20 x 5 rows would exceed the batch of 97, so as many as it holds, 19.
    assert calibration_microbatches(3, 97) == (3, 1, 24, 97)
    assert calibration_sizes(3, 97, None, 5) == (
        CalibrationSize(3), CalibrationSize(1), CalibrationSize(19, 5), CalibrationSize(20, 1))
    for reference, num_ranks in ((8, 2), (8, 12), (3, 5), (3, 11), (5, 1)):
        for batch_size in range(reference, 1001):
            sizes = calibration_sizes(reference, batch_size, None, num_ranks)
            assert all(size.step_rows(batch_size) <= batch_size for size in sizes), (reference, batch_size)
            assert max(size.num_microbatches for size in sizes) <= 4 * max(reference, num_ranks)
    with pytest.raises(ConfigError, match="calibration num_ranks = 0; give an integer of 1 or more"):
        calibration_sizes(8, 32, None, 0)


def test_parse_sizes_reads_what_format_sizes_writes():
    sizes = (CalibrationSize(8), CalibrationSize(32), CalibrationSize(32, 1))
    assert parse_sizes(format_sizes(sizes)) == sizes and format_sizes(sizes) == "8,32,32x1"
    assert parse_sizes(" 4 , 16x2") == (CalibrationSize(4), CalibrationSize(16, 2))


@pytest.mark.parametrize("text", ["8,", "8,x1", "8,32x", "8,32x0", "8,0", "8,2.5", "8,32y1", "8,32x1x1"])
def test_parse_sizes_refuses_a_bad_entry_naming_it(text):
    entry = text.split(",")[1]
    with pytest.raises(ConfigError, match=f"--microbatches entry '{entry}' of '{text}': give a micro-batch"):
        parse_sizes(text)


def test_blocks_alternate_the_sizes_in_rounds():
    assert blocks(12, 3) == [4, 4, 4]  # 3 rounds of 4 steps at each size
    assert blocks(14, 3) == [5, 5, 4]
    assert blocks(3, 3) == [3]  # too few steps for rounds
    assert blocks(12, 1) == [12]  # one size: one block
    assert len(blocks(100, 3)) == MAX_ROUNDS and sum(blocks(100, 3)) == 100


def test_check_sizes_refuses_what_a_running_pipeline_cannot_switch_to():
    config = load_config(overrides={"schedule.num_microbatches": 8})  # a batch of 32

    def check(text, steps=12):
        check_sizes(config, parse_sizes(text), steps)

    check("8,4,2")
    check("4,2,8")  # the reference first, the pipeline built for the most
    check("8,4,2,8x1")  # 8 one-row micro-batches, the batch's first 8 rows
    with pytest.raises(ConfigError, match=r"build the pipeline for the most of them, 16, not 8 \(train's"):
        check("8,16")
    with pytest.raises(ConfigError, match=r"build the pipeline for the most of them, 16, not 8"):
        check("8,16x1")
    with pytest.raises(ConfigError, match=r"build the pipeline for the most of them, 4, not 8"):
        check("4,2")
    with pytest.raises(ConfigError, match="is empty; give one or more sizes"):
        check_sizes(config, (), 12)
    with pytest.raises(ConfigError, match=r"\[4, 8, 8\] rows per micro-batch; give each number of rows once"):
        check("8,4,4")
    with pytest.raises(ConfigError, match=r"\[4, 8, 4\] rows per micro-batch"):
        check("8,4,8x4")  # a slice of the reference's rows
    with pytest.raises(
        ConfigError, match="entry 8x5: 40 rows, but the batch has 32 .per replica.; give at most 4"
    ):
        check("8,4,8x5")
    with pytest.raises(ConfigError, match="give more than 2"):
        check("8,4", 2)
    # With 2 replicas each draws 16 rows of the batch of 32.
    replicated = load_config(overrides={"schedule.num_microbatches": 8, "schedule.data_parallel": 2})
    with pytest.raises(ConfigError, match="entry 8x4: 32 rows, but the batch has 16"):
        check_sizes(replicated, parse_sizes("8,8x4"), 12)


def test_the_calibration_process_refuses_bad_sizes_before_any_rank_starts(tmp_path, capsys):
    code = main(["--result", str(tmp_path / "r.json"), "--microbatches", "4,2", "--phase-steps", "6", "--",
                 "--ranks", "2", "--microbatches", "8", "--out", str(tmp_path / "run")])
    assert code == 2 and "build the pipeline for the most of them, 4, not 8" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_split_blocks_add_half_a_size_and_keep_a_step_each_round():
    assert split_blocks(blocks(12, 3)) == [2, 2, 2]  # 3 kept steps: each block's first is left out
    assert split_blocks(blocks(3, 3)) == [2]
    assert split_blocks([9, 8]) == [5, 4]


def test_check_split_refuses_a_family_without_a_split_backward_or_a_virtual_layout():
    config = load_config(overrides={"schedule.num_microbatches": 8})
    check_split(config, SPLIT_FAMILY)
    check_split(config, None)  # no split phase
    with pytest.raises(ConfigError, match="runs no split backward"):
        check_split(config, "1f1b")
    with pytest.raises(ConfigError, match="2 stages per rank"):
        check_split(load_config(overrides={"schedule.name": "interleaved-1f1b", "schedule.virtual": 2}),
                    SPLIT_FAMILY)


def test_check_split_takes_a_family_with_every_backward_split_and_refuses_an_unknown_one():
    config = load_config(overrides={"schedule.num_microbatches": 8})
    check_split(config, "1f1b+split")
    check_split(config, "zb-h1")  # the split block of calibrations before
    with pytest.raises(ScheduleError, match="unknown schedule 'nope'"):
        check_split(config, "nope+split")
    with pytest.raises(ScheduleError, match="runs no whole backward"):
        check_split(config, "zb-h1+split")


def test_check_curve_refuses_an_unknown_family_or_a_virtual_layout():
    config = load_config(overrides={"schedule.num_microbatches": 8})
    check_curve(config, CURVE_FAMILY)
    check_curve(config, None)  # no curve phase
    with pytest.raises(ScheduleError, match="unknown schedule 'zb-h9'"):
        check_curve(config, "zb-h9")
    with pytest.raises(ConfigError, match="curve phase 'zb-h1': the pipeline runs 2 stages per rank"):
        check_curve(load_config(overrides={"schedule.name": "interleaved-1f1b", "schedule.virtual": 2}),
                    CURVE_FAMILY)


def test_check_held_refuses_a_split_family_or_a_virtual_layout():
    config = load_config(overrides={"schedule.num_microbatches": 8})
    check_held(config, HELD_FAMILY)
    check_held(config, None)  # no held phase
    with pytest.raises(ConfigError, match="'1f1b[+]split' splits its backward; name a family that runs"):
        check_held(config, SPLIT_FAMILY)
    with pytest.raises(ConfigError, match="'zb-h1' splits its backward; name a family that runs whole"):
        check_held(config, CURVE_FAMILY)
    with pytest.raises(ConfigError, match="held phase 'gpipe': the pipeline runs 2 stages per rank"):
        check_held(load_config(overrides={"schedule.name": "interleaved-1f1b", "schedule.virtual": 2}),
                   HELD_FAMILY)


def test_the_calibration_process_refuses_a_bad_split_family_before_any_rank_starts(tmp_path, capsys):
    code = main(["--result", str(tmp_path / "r.json"), "--microbatches", "8,4", "--phase-steps", "6",
                 "--split", "gpipe", "--", "--ranks", "2", "--microbatches", "8",
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "'gpipe' runs no split backward" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_the_calibration_command_trains_what_pipefold_train_runs_by_default(tmp_path):
    """`plan --profile`'s calibration run (the command `benchmarks/host_speed.py
    --against-calibration` runs too) is `pipefold train`'s default job: the same schedule,
    partition, model, batch and update, only fp32 (as profiled) with no sampling or evaluation,
    which run outside the step's clock."""
    import argparse
    import dataclasses

    from pipefold.cli.main import build_parser
    from pipefold.cli.plan_calibrate import DEFAULT_STEPS, calibration_command
    from pipefold.cli.train import add_parser, config_from_args

    plan_args = build_parser().parse_args(["plan", "--profile", "--ranks", "2", "--device", "cpu"])
    words = calibration_command(plan_args, 2, DEFAULT_STEPS, tmp_path, hf=False)
    assert words[words.index("--microbatches") + 1] == "8,4,2,16,32"  # 4, 8, 16, 2 and 1 rows: none capped
    assert words[words.index("--held") + 1] == HELD_FAMILY  # run on a CPU host only
    assert words[words.index("--curve") + 1] == CURVE_FAMILY  # so is the curve's block
    assert words[words.index("--split") + 1] == SPLIT_FAMILY == "1f1b+split"
    train_words = words[words.index("--") + 1:]
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    calibrated = config_from_args(parser.parse_args(["train", *train_words]))
    trained = config_from_args(parser.parse_args(
        ["train", "--ranks", "2", "--device", "cpu", "--precision", "fp32", "--set", "sample_tokens=0",
         "--set", "eval_every=0", "--out", str(tmp_path / "run")]))
    # Built for the most micro-batches it measures (32: a running pipeline switches only to as many or
    # fewer); its first, the reference, is train's 8.
    assert calibrated.schedule.num_microbatches == 32
    built_for_eight = dataclasses.replace(calibrated.schedule, num_microbatches=8)
    assert dataclasses.replace(calibrated, steps=trained.steps, schedule=built_for_eight) == trained


def test_the_calibration_command_slices_the_small_sizes_of_a_large_batch(tmp_path):
    """At a batch of 512 the one-row size runs 32 micro-batches of the batch's first 32 rows, in a
    pipeline built for 32, not 512 micro-batches of the whole batch in one built for 512."""
    from pipefold.cli.main import build_parser
    from pipefold.cli.plan_calibrate import DEFAULT_STEPS, calibration_command

    plan_args = build_parser().parse_args(["plan", "--profile", "--ranks", "2", "--batch-size", "512",
                                           "--device", "cpu"])
    words = calibration_command(plan_args, 2, DEFAULT_STEPS, tmp_path, hf=False)
    assert words[words.index("--microbatches") + 1] == "8,4,2,32x8,32x1"
    train_words = words[words.index("--") + 1:]
    assert train_words[train_words.index("--microbatches") + 1] == "32"
    assert train_words[train_words.index("--batch-size") + 1] == "512"


def test_the_calibration_process_refuses_a_bad_size_before_any_rank_starts(tmp_path, capsys):
    code = main(["--result", str(tmp_path / "r.json"), "--microbatches", "8,32x", "--phase-steps", "6", "--",
                 "--ranks", "2", "--microbatches", "32", "--out", str(tmp_path / "run")])
    assert code == 2 and "--microbatches entry '32x' of '8,32x'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
