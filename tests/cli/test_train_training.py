"""`pipefold train` with the training essentials (docs/training.md): gradient accumulation
trains as one larger batch, the clipped global norm and the lr of each step are reported, and the
validation loss through the pipeline equals the one-process one."""

from __future__ import annotations

import json
import math

import pytest

from pipefold.cli.main import main
from pipefold.job.optim import lr_factor

_TINY = (
    "train", "--steps", "3", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
    "--seq-len", "32", "--set", "data.max_bytes=100000", "--set", "sample_tokens=0", "--device", "cpu",
    "--clip-grad-norm", "0.5", "--lr-schedule", "cosine", "--min-lr", "1e-4", "--warmup-steps", "1",
)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_accumulation_trains_as_one_larger_batch_and_reports_norms(tmp_path, capfd):
    """2 accumulated batches of 4 rows == 1 batch of 8 rows (same rows, same micro-batch size).
    The accumulated run also records its CPU allocations (--memory-peaks): its losses are the same."""
    summaries = {}
    reports = {}
    for name, extra in {
        "accumulated": ["--batch-size", "4", "--microbatches", "2", "--grad-accumulation", "2",
                        "--memory-peaks"],
        # Evaluated through the pipeline at steps 2 and 3, on the batches the final check uses.
        "one": ["--batch-size", "8", "--microbatches", "4", "--eval-every", "2"],
    }.items():
        out = tmp_path / name
        assert main([*_TINY, *extra, "--out", str(out)]) == 0, capfd.readouterr().err
        summaries[name] = json.loads((out / "summary.json").read_text())
        reports[name] = capfd.readouterr().out
    accumulated, one = summaries["accumulated"], summaries["one"]
    # float32 summation order differs between the two (AdamW carries it along three steps).
    assert accumulated["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert accumulated["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-3)
    assert all(math.isfinite(norm) and norm > 0 for norm in one["grad_norms"])
    factor = lr_factor("cosine", warmup_steps=1, total_steps=3, min_ratio=1e-4 / 3e-3)
    assert one["lrs"] == pytest.approx([3e-3 * factor(step) for step in range(3)])
    assert accumulated["tokens_per_s"] > 0
    # The pipelined evaluation after the last step equals rank 0's one-process validation of
    # the gathered model (same 4 held-out batches).
    assert [entry["step"] for entry in one["evals"]] == [2, 3]
    # The default evaluation (every 50 steps and after the last) evaluates the 3-step run at its end.
    assert [entry["step"] for entry in accumulated["evals"]] == [3]
    assert accumulated["evals"][0]["loss"] == pytest.approx(accumulated["val_loss"], rel=1e-5)
    assert one["evals"][-1]["loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert one["evals"][-1]["perplexity"] == pytest.approx(math.exp(one["val_loss"]), rel=1e-5)
    # metrics.jsonl: one line per step with what summary.json lists, evaluation keys on steps 2, 3.
    lines = [json.loads(text) for text in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert [line["loss"] for line in lines] == one["losses"]
    assert [line["grad_norm"] for line in lines] == one["grad_norms"]
    assert [line["lr"] for line in lines] == one["lrs"]
    assert all(line["tokens_per_s"] > 0 and 0 <= line["bubble"] < 1 for line in lines)
    # Every pipeline rank's activation peak each step; the run's last equals the summary's memory.
    assert all(len(line["activation_bytes_peak"]) == 2 for line in lines)
    assert all(peak > 0 for line in lines for peak in line["activation_bytes_peak"])
    last = {
        entry["pipeline_rank"]: entry["activations_peak"] for entry in one["memory"] if entry["replica"] == 0
    }
    # --memory-peaks: each rank's profiled allocations over the kept steps 2-3 (cpu_*: a fresh
    # run's ranks hold only their weights before the first step; the steps then keep AdamW's
    # state and more, and each step's pipeline call allocates beyond that).
    for entry in accumulated["memory"]:
        assert entry["cpu_kept_steps"] == 2
        assert entry["cpu_allocated_before_steps"] >= entry["weights"]
        assert entry["cpu_allocated_kept_start"] >= entry["weights"] + entry["optimizer"]
        kept_start = entry["cpu_allocated_kept_start"]
        assert entry["cpu_allocated_peak"] >= entry["cpu_allocated_peak_pipeline"] > kept_start
    assert "CPU allocations per rank (MiB), replica 0, 2 kept steps" in reports["accumulated"]
    assert "CPU allocations" not in reports["one"]
    # On CPU the memory entries keep their keys, and no allocator's (cuda_*: pipefold.job.allocator_peaks).
    assert all(set(entry) == {"world_rank", "pipeline_rank", "replica", "weights", "optimizer",
                              "activations_peak", "casts"} for entry in one["memory"])
    assert lines[-1]["activation_bytes_peak"] == [last[rank] for rank in range(2)]
    assert [line.get("eval_loss") for line in lines] == [None, *(entry["loss"] for entry in one["evals"])]
    assert lines[-1]["eval_perplexity"] == pytest.approx(one["evals"][-1]["perplexity"])
    # TensorBoard (installed with the dev extra): the same scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "one" / "tensorboard"))
    board.Reload()
    assert [event.step for event in board.Scalars("train/loss")] == [1, 2, 3]
    assert [event.value for event in board.Scalars("train/loss")] == pytest.approx(one["losses"])
    assert [event.step for event in board.Scalars("memory/activation_bytes_peak/rank1")] == [1, 2, 3]
    assert [event.value for event in board.Scalars("eval/loss")] == pytest.approx(
        [entry["loss"] for entry in one["evals"]]
    )
