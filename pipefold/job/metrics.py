"""Per-step metrics of `pipefold train`: `<out>/metrics.jsonl`, and TensorBoard when installed.

    writer = MetricsWriter(Path(config.out), append=bool(config.resume))
    writer.write(record)          # one JSON object per step (and the evaluation's keys)
    writer.close()

Rank 0 writes one line per optimizer step as the step ends, flushed, so a run that crashes
keeps every line written before it. Keys: `step` (1-based, the steps done), `loss`,
`tokens_per_s`, `step_time_s`, `bubble` (the measured idle fraction of the step's timeline),
`grad_norm` and `lr` (flush schedules), `loss_scale` and `skipped` (fp16), `mfu` (model FLOPs
utilization, where config.hardware gives the peak), `seq_len` (the step's sequence length, with
data.bucket_by_length), `activation_bytes_peak` (per pipeline rank, the step's peak of saved
activations), and on evaluation steps `eval_loss` and `eval_perplexity`. Where `tensorboard` is installed
(`pip install pipefold[tensorboard]`) the same numbers go to `<out>/tensorboard` as scalars
(`train/loss`, `eval/loss`, ...). docs/training.md, "Metrics", says what is not recorded.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import IO, Any

from pipefold.job.report import StepStats

__all__ = ["METRICS_FILE", "TENSORBOARD_DIR", "MetricsWriter", "metrics_of"]

METRICS_FILE = "metrics.jsonl"
"""Where in `out` the per-step metrics go."""

TENSORBOARD_DIR = "tensorboard"
"""Where in `out` the TensorBoard event files go (when tensorboard is installed)."""


def metrics_of(record: StepStats) -> dict[str, Any]:
    """The JSON object of one step (keys that do not apply to the run are left out)."""
    line: dict[str, Any] = {
        "step": record.step + 1,
        "loss": record.loss,
        "tokens_per_s": record.tokens_per_s,
        "step_time_s": record.seconds,
        "bubble": record.bubble_fraction,
    }
    if record.grad_norm is not None:
        line["grad_norm"] = record.grad_norm
    if record.lr is not None:
        line["lr"] = record.lr
    if record.loss_scale is not None:
        line["loss_scale"] = record.loss_scale
        line["skipped"] = record.skipped
    if record.mfu is not None:
        line["mfu"] = record.mfu
    if record.seq_len is not None:
        line["seq_len"] = record.seq_len
    if record.activation_bytes_peak:
        line["activation_bytes_peak"] = list(record.activation_bytes_peak)
    if record.eval_loss is not None:
        line["eval_loss"] = record.eval_loss
        line["eval_perplexity"] = math.exp(min(record.eval_loss, 700.0))
    return line


class MetricsWriter:
    """Appends each step's metrics to `<out>/metrics.jsonl` (and TensorBoard); rank 0 only."""

    def __init__(self, out: Path, *, append: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        # A resumed run continues the file; a fresh one (into a new or overwritten out) starts it.
        self._file: IO[str] = (out / METRICS_FILE).open("a" if append else "w", encoding="utf-8")
        self._board: Any = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))

    def write(self, record: StepStats) -> None:
        line = metrics_of(record)
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._board is not None:
            step = line["step"]
            for key, value in line.items():
                if key == "activation_bytes_peak":
                    for rank, peak in enumerate(value):
                        self._board.add_scalar(f"memory/activation_bytes_peak/rank{rank}", peak, step)
                    continue
                if key == "step" or isinstance(value, bool):
                    continue
                group = "eval" if key.startswith("eval_") else "train"
                self._board.add_scalar(f"{group}/{key.removeprefix('eval_')}", value, step)
            self._board.flush()

    def close(self) -> None:
        self._file.close()
        if self._board is not None:
            self._board.close()
