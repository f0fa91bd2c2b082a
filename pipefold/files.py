"""Atomic file writes: a reader sees the old file or the new one, never half of one.

    from pipefold.files import write_atomic
    write_atomic("runs/x/summary.json", json.dumps(summary))     # str is written as UTF-8

The data goes to a temporary file beside the target (so the rename stays on one file
system), is flushed to disk, and is renamed over the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]

_DEFAULT_MODE = 0o644


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` (str as UTF-8) to a temporary file beside `path`, then rename it over `path`.
    Creates missing parent directories; returns the path written."""
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp makes owner-only files; outputs are for sharing, so keep the mode of the file
    # being replaced, or use the usual rw-r--r--.
    mode = target.stat().st_mode & 0o777 if target.exists() else _DEFAULT_MODE
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        # Never leave a half-written temporary behind, whatever interrupted the write.
        Path(temporary).unlink(missing_ok=True)
        raise
    return target
