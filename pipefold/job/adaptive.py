"""`pipefold train --adaptive` on the ranks: the chooser for the job's pipeline (its partition and
placement), checked on every batch shape the data can give before the first step.

    runner = adaptive_runner(config, pipe, shapes)   # on every rank, in set_up
    choice = runner.prepare(inputs); pipe.step(inputs, targets); runner.finish(choice)

How the chooser prices a length: pipefold.job.adaptive_choice.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipefold.job.adaptive_choice import gpt_chooser, replica_rows
from pipefold.job.config import TrainConfig
from pipefold.runtime import Pipeline
from pipefold.runtime.adaptive import AdaptiveRunner

__all__ = ["adaptive_runner"]


def adaptive_runner(config: TrainConfig, pipe: Pipeline, shapes: Sequence[tuple[int, int]]) -> AdaptiveRunner:
    """The job's runner; every (global rows, length) in `shapes` is priced now (one replica's
    rows), so a batch no choice fits is refused (`BatchTooLong`) on every rank before the first step."""
    chooser = gpt_chooser(
        config.model, config.schedule, config.compute_precision, bounds=pipe.partition.bounds,
        placement=pipe.schedule.placement, device_type=pipe.device.type,
    )
    for rows, length in shapes:
        chooser.ranked(replica_rows(rows, pipe.num_data_parallel), length)
    return AdaptiveRunner(pipe, chooser)
