"""The fork server ranks start from: a fresh interpreter that has imported torch once, which
every rank of a launch is forked from (`rank_context`), stopped when the launcher exits
(`stop_fork_server`); and the launcher's stdout and stderr handed to a rank through it
(`launcher_output`). Why a fork server: docs/decisions.md, "Ranks fork from a server that has
imported torch"."""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.reduction
import os
import signal
from typing import Any

__all__ = ["PRELOAD", "InheritedFd", "launcher_output", "rank_context", "stop_fork_server"]


# What a rank imports before it runs anything: the fork server imports it once, and every rank
# forked from it starts with these modules loaded (a torch import costs seconds per process).
# torch._dynamo: a pipeline's first optimizer step imports it (about 0.5 CPU s per rank).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "pipefold.runtime"]


def rank_context() -> multiprocessing.context.BaseContext:
    """The multiprocessing context ranks start from: a fork server with torch imported where the
    platform has one (POSIX), else "spawn". The server is a fresh interpreter started once per
    launching process (never a fork of it: the launcher's threads and CUDA state stay its own);
    each rank forked from it gets the launcher's sys.path and working directory as under spawn
    (multiprocessing prepares them), and `launch._run_function` gives it the launcher's environment."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    global _stop_registered
    if not _stop_registered:
        atexit.register(stop_fork_server)
        _stop_registered = True
    return context


_stop_registered = False


def stop_fork_server() -> bool:
    """Kill this process's fork server, if it started one; True if there was one to stop.

    Run at the launcher's exit: left to itself, the server notices the launcher's end only then
    and runs a whole interpreter shutdown with torch loaded (about half a second of a core),
    beside whatever the user starts next, e.g. a benchmark's next run or `pipefold train` right
    after `pipefold plan`. The server holds no state of ours (ranks have ended, and each watches
    its launcher anyway), so it is killed, then reaped by multiprocessing's own stop, which
    also forgets it: a later launch in this process starts a new one."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    stop = getattr(server, "_stop", None)
    if server is None or pid is None or stop is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    stop()
    return True


class InheritedFd:
    """A file descriptor of the launcher that a rank gets a duplicate of, however it starts
    (pickled through multiprocessing's `DupFd`, which a fork server passes along)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_received_fd, (multiprocessing.reduction.DupFd(self.fd),))  # type: ignore[attr-defined]


def launcher_output() -> tuple[InheritedFd, InheritedFd] | None:
    """This process's stdout and stderr for a rank, or None where either is closed."""
    try:
        os.fstat(1)
        os.fstat(2)
    except OSError:
        return None
    return InheritedFd(1), InheritedFd(2)


def _received_fd(duplicate: Any) -> int:
    fd: int = duplicate.detach()
    return fd
