"""Ranks die with the process that started them.

A supervisor (`pipefold launch`, `spawn`, the benchmark harness) stops its ranks when one
fails or on Ctrl-C. But a supervisor killed outright (SIGKILL, or SIGTERM, whose default
action skips every `finally`) cannot: its ranks would go on computing, or sit in a
collective, holding cores and ports with nobody left to read their output. Found when a
killed benchmark run left four ranks running that slowed the next run 2.5x.

On Linux each rank asks the kernel to send it SIGKILL when its parent exits
(`prctl(PR_SET_PDEATHSIG)`; strictly, when the parent's thread that started it exits: every
supervisor here starts its ranks from its main thread). The request survives `exec`, so
a script worker can make it between fork and exec (`_prctl` is resolved in the parent
first, so the child only calls it). Elsewhere (no prctl) this does nothing and the
supervisor's own stop path is the only guard.

A rank forked from a fork server (`spawn`'s ranks) has the server, not the supervisor, as its
parent, and the server lives as long as any of its children: such a rank watches the
supervisor itself (`die_with_supervisor`: a thread blocked on a pidfd of the supervisor,
which becomes readable when it exits).
"""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import select
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["arm_orphan_guard", "die_with_parent", "die_with_supervisor"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Have the kernel SIGKILL this process when its parent exits; True if armed.

    `parent_pid` is the supervisor's pid as the supervisor saw it; in a multiprocessing
    child it defaults to the one multiprocessing recorded. The parent may have died before
    the request was made (then the kernel will never signal): if our parent is no longer
    `parent_pid`, exit at once instead.
    """
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else None
    prctl = _prctl()
    if prctl is None or prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    return True


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once. Call this in the parent before forking: the child's
    call between fork and exec then only calls it (no dlopen, no search)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl  # libc is in the process
        return prctl
    except (OSError, AttributeError):
        return None


def arm_orphan_guard() -> bool:
    """Resolve prctl in this (parent) process; True where `die_with_parent` can work."""
    return _prctl() is not None


def die_with_supervisor(supervisor_pid: int) -> bool:
    """SIGKILL this process when `supervisor_pid` (not its parent) exits; True if armed.

    Exits at once if the supervisor is already gone. Needs Linux's pidfd (5.3 and later).
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return False
    try:
        pidfd = pidfd_open(supervisor_pid)
    except ProcessLookupError:
        os._exit(1)
    except OSError:
        return False

    def watch() -> None:
        waiter = select.poll()  # not select: it refuses descriptors numbered 1024 and above
        waiter.register(pidfd, select.POLLIN)
        waiter.poll()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="pipefold-supervisor-watch", daemon=True).start()
    return True
