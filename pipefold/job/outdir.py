"""The run directory (`out`), checked before any worker starts: torch-free.

    check_out_dir(config)      # ConfigError now, not a traceback after the run

It must be a directory this process can create and write (not under a file, not in /proc;
nothing is created here, so a refused configuration leaves no directory behind). And
it must not silently overwrite an earlier run's checkpoint: a directory that holds one is
refused unless the run resumes from that checkpoint or `overwrite` says to replace it.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from pipefold.errors import ConfigError
from pipefold.job.config import CHECKPOINT_DIR, TrainConfig

__all__ = ["check_out_dir", "resolve_out_dir"]

_PSEUDO = (Path("/proc"), Path("/sys"), Path("/dev"))
"""Kernel file systems: writable in places, never a place for a run."""


def check_out_dir(config: TrainConfig) -> Path:
    """Check that `config.out` is, or can be created as, a writable directory; refuse to
    overwrite an earlier run's checkpoint there unless `config.resume` is that checkpoint or
    `config.overwrite`. Returns the directory."""
    if not config.out:
        raise ConfigError("out is empty; call resolve_out_dir(config) first (default runs/<timestamp>)")
    out = Path(config.out)
    resolved = out.expanduser().resolve()
    for pseudo in _PSEUDO:
        if resolved == pseudo or pseudo in resolved.parents:
            raise ConfigError(
                f"out={config.out!r} is inside {pseudo}, a kernel file system; give a directory on a disk "
                "(e.g. --out runs/my-run)"
            )
    existing = next((c for c in (out, *out.parents) if c.exists()), Path("."))
    if not existing.is_dir():
        problem = f"{str(existing)!r} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        what = "it" if existing == out else f"{str(existing)!r}, where it would be created,"
        problem = f"{what} is not writable by this user"
    else:
        problem = None
    if problem is not None:
        raise ConfigError(
            f"out={config.out!r} cannot be used as the run directory: {problem}; give a directory "
            "this user can create and write (e.g. --out runs/my-run)"
        )
    _check_earlier_run(config, out)
    return out


def _check_earlier_run(config: TrainConfig, out: Path) -> None:
    checkpoint = out / CHECKPOINT_DIR
    marker = checkpoint / "pipefold.json"
    if not marker.exists() or config.overwrite:
        return
    if config.resume and Path(config.resume).resolve() == checkpoint.resolve():
        return  # continuing that run: its checkpoint is replaced by a later one, as intended
    try:
        step = json.loads(marker.read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    at = f" (at step {step})" if isinstance(step, int) else ""
    resume = f"--resume {checkpoint}" + (f" --steps N with N > {step}" if isinstance(step, int) else "")
    raise ConfigError(
        f"out={config.out!r} holds the checkpoint of an earlier run{at}, which this run would overwrite; "
        f"continue that run with {resume}, give another --out, or pass --overwrite to replace it"
    )


def resolve_out_dir(config: TrainConfig) -> TrainConfig:
    """Fix `out` before any worker starts, so every rank agrees (default runs/<timestamp>)."""
    if config.out:
        return config
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = Path("runs") / stamp
    suffix = 1
    while candidate.exists():
        candidate = Path("runs") / f"{stamp}-{suffix}"
        suffix += 1
    return replace(config, out=str(candidate))
