"""benchmarks/planner_memory.py --device cuda: its comparison of a plan with a CUDA rank's
allocator peaks, its verdict and its train command, on synthetic summaries (no GPU here)."""

from __future__ import annotations

import pytest

from benchmarks.planner_memory import (
    ALLOCATOR_HEADER,
    GPU_STEPS,
    RunFailed,
    allocator_error,
    allocator_row,
    allocator_verdict,
    cuda_train_command,
    reserve_note,
)

MiB = 2**20
PLAN = {"weights": 200 * MiB, "gradients": 200 * MiB, "optimizer": 400 * MiB, "activations": 150 * MiB,
        "recompute": 50 * MiB, "casts": 0, "total": 1000 * MiB}
ENTRY = {"world_rank": 0, "pipeline_rank": 0, "replica": 0, "weights": 200 * MiB, "optimizer": 400 * MiB,
         "activations_peak": 140 * MiB, "casts": 0,
         "cuda_allocated_before_steps": 200 * MiB, "cuda_allocated_kept_start": 632 * MiB,
         "cuda_allocated_peak": 1250 * MiB, "cuda_allocated_peak_pipeline": 1000 * MiB,
         "cuda_reserved_peak": 1400 * MiB, "cuda_kept_steps": 2}


PRICED = {**PLAN, "update": 400 * MiB, "pipeline_total": 1000 * MiB, "update_total": 1200 * MiB,
          "total": 1200 * MiB}
"""A plan that prices the update's temporaries (RankMemory.to_json): the step peaks in the update."""


def test_a_plan_without_the_update_is_compared_as_before():
    assert allocator_error(PLAN, ENTRY) == pytest.approx(1000 / 1250 - 1)  # -20%: the update's peak
    assert allocator_error(PLAN, ENTRY, "cuda_allocated_peak_pipeline") == pytest.approx(0.0)


def test_the_whole_step_total_meets_the_steps_peak_and_the_pipeline_part_the_calls():
    assert allocator_error(PRICED, ENTRY) == pytest.approx(1200 / 1250 - 1)
    assert allocator_error(PRICED, ENTRY, "cuda_allocated_peak_pipeline") == pytest.approx(0.0)
    row = dict(zip(ALLOCATOR_HEADER, allocator_row("1f1b m=4 recompute=none", ENTRY, PRICED), strict=True))
    columns = ("update temporaries MiB (plan)", "pipeline call MiB (plan)", "total MiB (plan)")
    assert tuple(row[column] for column in columns) == ("400.0", "1000.0", "1200.0")


def test_a_row_puts_each_side_in_its_column():
    row = dict(zip(ALLOCATOR_HEADER, allocator_row("1f1b m=4 recompute=full", ENTRY, PLAN), strict=True))
    assert row == {
        "configuration": "1f1b m=4 recompute=full", "rank": "0",
        "activations MiB (plan)": "150.0", "activations MiB (counted)": "140.0",
        "weights + optimizer MiB (plan)": "600.0", "allocated between steps MiB": "632.0",
        "update temporaries MiB (plan)": "0.0", "pipeline call MiB (plan)": "1000.0",
        "total MiB (plan)": "1000.0", "allocated peak MiB": "1250.0", "pipeline call peak MiB": "1000.0",
        "reserved peak MiB": "1400.0", "error (pipeline call)": "+0.0%", "error": "-20.0%",
    }


def test_a_summary_without_allocator_peaks_is_refused_not_compared():
    cpu_entry = {key: value for key, value in ENTRY.items() if not key.startswith("cuda_")}
    with pytest.raises(RunFailed, match="did not train on CUDA"):
        allocator_row("gpipe m=2 recompute=none", cpu_entry, PLAN)
    with pytest.raises(RunFailed, match="did not train on CPU with --memory-peaks"):
        allocator_row("gpipe m=2 recompute=none", cpu_entry, PLAN, device="cpu")


def test_the_verdict_counts_rows_within_ten_percent_and_names_the_largest_error():
    within = allocator_row("a", {**ENTRY, "cuda_allocated_peak": 1050 * MiB}, PLAN)    # -4.8%
    edge = allocator_row("b", {**ENTRY, "cuda_allocated_peak": 1100 * MiB}, PLAN)      # -9.1%
    above = allocator_row("c", {**ENTRY, "cuda_allocated_peak": 880 * MiB}, PLAN)      # +13.6%
    assert allocator_verdict([within, edge, above]) == (
        "2 of 3 rank totals within 10% of the allocator's peak (largest error +13.6%)")
    assert allocator_verdict([within], num_failed=1) == (
        "1 of 1 rank totals within 10% of the allocator's peak (largest error -4.8%); "
        "1 configuration(s) failed")
    assert allocator_verdict([], num_failed=2) == "no rank measured; 2 configuration(s) failed"


def test_the_reserve_note_sets_the_files_reserve_beside_the_measured_slack():
    tight = {**ENTRY, "cuda_reserved_peak": 1262 * MiB}
    rows = [allocator_row("a", ENTRY, PLAN), allocator_row("b", tight, PLAN)]
    note = reserve_note("h100-80gb", rows)
    assert note.startswith("hardware h100-80gb: reserve 6.0 GiB per device")
    assert "(reserved - allocated at peak): 12.0-150.0 MiB per rank" in note


def test_the_planned_command_trains_on_the_gpu_for_the_kept_steps_without_extra_work():
    command = cuda_train_command(
        "pipefold train --schedule gpipe --ranks 1 --microbatches 4 --partition 8 --precision fp32 "
        "--set 'recompute=[0,1,2,3,4,5,6,7]'")
    assert command == [
        "train", "--schedule", "gpipe", "--ranks", "1", "--microbatches", "4", "--partition", "8",
        "--precision", "fp32", "--set", "recompute=[0,1,2,3,4,5,6,7]", "--device", "cuda",
        "--steps", str(GPU_STEPS), "--eval-every", "0", "--set", "sample_tokens=0",
    ]
    assert GPU_STEPS >= 2  # the first step is warm-up: a kept step must follow it
