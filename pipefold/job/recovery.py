"""Automatic recovery: a restarted training job resumes from its latest checkpoint.

    pipefold train --checkpoint-every 50 --max-restarts 3            # local: run_local restarts
    torchrun --max-restarts 3 --nproc-per-node 2 -m pipefold train --out runs/x --checkpoint-every 50

Both launchers mark a restart with torchrun's TORCHELASTIC_RESTART_COUNT (> 0 after the first
failure); `resume_after_restart` then points the configuration at <out>/checkpoint, the latest
complete checkpoint (saves are published by a rename, so it is never half written), and the
run continues from its step with its weights, optimizer, learning rate and random states.

A test-only fault: PIPEFOLD_TEST_EXIT_AT="RANK:STEP" makes world rank RANK kill itself with
SIGKILL before running step STEP (0-based, so STEP steps are done), in the first attempt only.
Torch-free: the CLI uses it before any worker starts.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

from pipefold.errors import ConfigError
from pipefold.job.config import CHECKPOINT_DIR, TrainConfig

__all__ = ["FAULT_ENV", "RESTART_ENV", "die", "exit_step", "restart_count", "resume_after_restart"]

RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
"""How many times the ranks were restarted (torchrun's variable; `run_local` sets it too)."""

FAULT_ENV = "PIPEFOLD_TEST_EXIT_AT"
"""Test-only: "RANK:STEP", the world rank that dies hard and the step before which it does."""


def restart_count() -> int:
    """0 in a first attempt; n after the n-th restart."""
    text = os.environ.get(RESTART_ENV, "0")
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"{RESTART_ENV}={text!r} is not a restart count; unset it or give an integer"
        ) from None


def resume_after_restart(config: TrainConfig) -> TrainConfig:
    """`config` resuming from <out>/checkpoint where this is a restart and that checkpoint
    exists; otherwise `config` unchanged (a first attempt, or a restart before any save, which
    starts over)."""
    if restart_count() == 0 or not config.out:
        return config
    checkpoint = Path(config.out) / CHECKPOINT_DIR
    if not (checkpoint / "pipefold.json").is_file():
        return config
    return dataclasses.replace(config, resume=str(checkpoint))


def exit_step(rank: int) -> int | None:
    """The step before which this rank must die (FAULT_ENV), or None: read once per run, so
    the loop's per-step check is one comparison, and nothing at all where it is unset."""
    text = os.environ.get(FAULT_ENV)
    if not text or restart_count() > 0:
        return None
    try:
        fault_rank, step = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"{FAULT_ENV}={text!r} is not RANK:STEP (e.g. 1:3); unset it") from None
    return step if fault_rank == rank else None


def die() -> None:
    """End this process as a crash would: SIGKILL, no clean-up, no exception."""
    os.kill(os.getpid(), signal.SIGKILL)
