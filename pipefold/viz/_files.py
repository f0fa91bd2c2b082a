"""Atomic file writes: a reader never sees a half-written chart or trace."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]

_DEFAULT_MODE = 0o644


def write_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp makes owner-only files; a chart or trace is for sharing, so keep the mode of
    # the file being replaced, or use the usual rw-r--r--.
    mode = target.stat().st_mode & 0o777 if target.exists() else _DEFAULT_MODE
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
