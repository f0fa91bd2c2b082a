"""Doorbells: a blocking wake-up next to a shared-memory flag, for ranks that share cores.

Design notes: docs/decisions.md, "doorbells".
"""

from __future__ import annotations

import os
import select
import stat
import weakref
from pathlib import Path

__all__ = ["Doorbell", "Ringer"]

_DRAIN_BYTES = 1 << 16


class Doorbell:
    """The waiting side: `wait(timeout_s)` returns when rung (or after the timeout)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        # poll, not select: select refuses descriptors numbered 1024 and above, which a
        # long-lived process that has built many pipelines (and groups) reaches.
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def create(cls, directory: Path, name: str) -> Doorbell:
        path = directory / name
        os.mkfifo(path, 0o600)
        try:
            # Non-blocking read end: opening does not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return cls(path, fd)

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self._closer()

    def wait(self, timeout_s: float) -> None:
        if self._poll.poll(max(timeout_s, 0.0) * 1000.0):  # milliseconds
            try:
                os.read(self._fd, _DRAIN_BYTES)
            except BlockingIOError:
                pass


class Ringer:
    """The producing side of a `Doorbell`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def open(cls, directory: Path, name: str) -> Ringer | None:
        """The write end, or None when the FIFO is not there (or has no reader)."""
        path = directory / name
        try:
            if not stat.S_ISFIFO(os.stat(path).st_mode):
                return None
            return cls(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return None

    def close(self) -> None:
        self._closer()

    def ring(self) -> None:
        try:
            os.write(self._fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, hence not empty: the waiter wakes anyway
        except BrokenPipeError:
            pass  # the waiter is gone; the watchdog reports it where it matters
