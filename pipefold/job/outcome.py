"""How a training run that stopped on an error is recorded: rank 0 writes summary.json with the
error (its type, message, the step it stopped at and the rank to blame), the configuration and
the losses of the steps that ran, so a failed run leaves the same file a finished one does.

    try:
        ...the step loop...
    except BaseException as error:
        record_failure(config, records, step, error)   # rank 0; a no-op elsewhere
        raise
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipefold.errors import NonFiniteLoss
from pipefold.files import write_atomic
from pipefold.job.config import CHECKPOINT_DIR, TrainConfig
from pipefold.job.report import StepStats

__all__ = ["failure_summary", "name_the_step", "record_failure"]


def name_the_step(error: NonFiniteLoss, step: int) -> NonFiniteLoss:
    """The pipeline's non-finite error with the job's step (1-based, counted from the first run)
    and the CLI's way to skip such steps."""
    return NonFiniteLoss(
        f"step {step}: {error} (pipefold train: --on-nonfinite skip)", failed_rank=error.failed_rank
    )


def failure_summary(
    config: TrainConfig, records: Sequence[StepStats], step: int, error: BaseException
) -> dict[str, Any]:
    """summary.json of a run that stopped at `step` (1-based) on `error`."""
    return {
        "config": config.to_dict(),
        "status": "failed",
        "error": {
            "type": type(error).__name__,
            "message": str(error),
            "step": step,
            "failed_rank": getattr(error, "failed_rank", None),
        },
        "start_step": records[0].step if records else step - 1,
        "checkpoint": str(Path(config.out) / CHECKPOINT_DIR),
        "losses": [r.loss for r in records],
        "step_seconds": [r.seconds for r in records],
        "final_loss": records[-1].loss if records else None,
    }


def record_failure(
    config: TrainConfig, records: Sequence[StepStats], step: int, error: BaseException, *, rank: int
) -> Path | None:
    """On rank 0, write `failure_summary` to <out>/summary.json; the path, or None (other ranks,
    or an out directory that cannot be written: the error being raised says more)."""
    if rank != 0 or not config.out:
        return None
    path = Path(config.out) / "summary.json"
    try:
        write_atomic(path, json.dumps(failure_summary(config, records, step, error), indent=2))
    except OSError:
        return None
    return path
