"""Remove a launched job's shared-memory files once its launcher is gone, however it went.

Ranks unlink their channel files as soon as both ends have mapped them, but a rank (or the
launcher, whose ranks the kernel then kills) killed in the few milliseconds between creating
a file and that point leaves it in /dev/shm for good. Each launch names its files with a job
token (`pipefold-<job>-...`, pipefold/runtime/transport/shm.py) and:

    janitor = start_janitor(job)       # a tiny process holding the read end of a pipe
    ...                                # run the ranks
    sweep(job); janitor.stop()         # a normal end: sweep now

The janitor blocks on the pipe; when the launcher exits (even by SIGKILL) the pipe closes and
it sweeps the job's files, twice a second apart to catch ranks that were still dying. It runs
this file as a script, so it imports neither torch nor pipefold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Janitor", "start_janitor", "sweep"]

_SHM_DIR = "/dev/shm"


def sweep(prefix: str, directory: str = _SHM_DIR) -> list[str]:
    """Remove the files in `directory` whose names start with `prefix`; the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


class Janitor:
    """The janitor process of one job; `stop()` ends it without waiting for the launcher's exit."""

    def __init__(self, process: subprocess.Popen[bytes] | None) -> None:
        self._process = process

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        if process.stdin is not None:
            process.stdin.close()  # EOF: it sweeps (nothing left) and exits
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def start_janitor(prefix: str, directory: str = _SHM_DIR) -> Janitor:
    """Start the process that sweeps `prefix*` in `directory` once this process is gone."""
    if not prefix.startswith("pipefold-") or len(prefix) <= len("pipefold-"):
        raise ValueError(f"start_janitor: refusing to sweep the broad prefix {prefix!r}")
    try:
        process = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve()), prefix, directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            # Its own session: a Ctrl-C to the launcher's process group must not end it first.
            start_new_session=True,
        )
    except OSError:
        return Janitor(None)  # no janitor: the launcher's own sweep still runs on a normal end
    return Janitor(process)


def _main(prefix: str, directory: str) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, KeyboardInterrupt):
        pass
    sweep(prefix, directory)
    time.sleep(1.0)
    sweep(prefix, directory)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
