"""A micro-batch size the calibration run measures (`pipefold.job.calibration`), and how its
command line writes it (torch-free: `pipefold plan` builds the command, the ranks run it).

    parse_sizes("8,4,2,32,32x1")   # 8, 4, 2 and 32 micro-batches of the whole batch, then 32 of one row

A count alone runs the whole batch in that many micro-batches, as `pipefold train` runs it. A
count and rows (`32x1`) run that many micro-batches of that many rows: the first count x rows
rows of the drawn batch. The calibration slices a size of few rows so, because per-action costs
are what it fits (`measured_cost_model`): 32 one-row micro-batches time a one-row F and B as 512
of them do once 1F1B has reached its steady state, and the pipeline is built for the most
micro-batches any size runs (`pipefold.cli.plan_calibrate.calibration_sizes` caps them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipefold.errors import ConfigError

__all__ = ["CalibrationSize", "format_sizes", "parse_sizes"]


@dataclass(frozen=True)
class CalibrationSize:
    """`num_microbatches` micro-batches of the whole batch, or (`sliced_rows`) of that many rows each."""

    num_microbatches: int
    sliced_rows: int | None = None
    """Rows per micro-batch of a slice of the batch (its first `num_microbatches` x `sliced_rows`
    rows); None: the whole batch, cut as `pipefold train` cuts it."""

    def __post_init__(self) -> None:
        for name, value in (("micro-batch count", self.num_microbatches), ("rows", self.sliced_rows)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"calibration size {name} = {value!r}; give an integer of 1 or more")

    def step_rows(self, batch_rows: int) -> int:
        """Rows one step runs, of a batch of `batch_rows`."""
        return batch_rows if self.sliced_rows is None else self.num_microbatches * self.sliced_rows

    def microbatch_rows(self, batch_rows: int) -> int:
        """Rows per micro-batch (the largest, where the batch does not divide evenly)."""
        if self.sliced_rows is not None:
            return self.sliced_rows
        return math.ceil(batch_rows / self.num_microbatches)

    def __str__(self) -> str:
        count = self.num_microbatches
        return str(count) if self.sliced_rows is None else f"{count}x{self.sliced_rows}"


def format_sizes(sizes: Sequence[CalibrationSize]) -> str:
    """The command line's `--microbatches` value of `sizes` ("8,4,2,32,32x1")."""
    return ",".join(map(str, sizes))


def parse_sizes(text: str) -> tuple[CalibrationSize, ...]:
    """The sizes a `--microbatches` value names (`format_sizes`'s inverse); ConfigError on a bad entry."""
    sizes = []
    for part in text.split(","):
        count, sliced, rows = part.strip().partition("x")
        try:
            sizes.append(CalibrationSize(int(count), int(rows) if sliced else None))
        except (ValueError, ConfigError):
            raise ConfigError(
                f"calibration --microbatches entry {part!r} of {text!r}: give a micro-batch count (8: the "
                "whole batch in 8) or a count and rows per micro-batch (32x1: 32 micro-batches of one row, "
                "the batch's first 32 rows), each an integer of 1 or more"
            ) from None
    return tuple(sizes)
