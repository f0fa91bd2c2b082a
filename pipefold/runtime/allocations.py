"""A CPU allocator's allocations and frees over a stretch of work, recorded by torch's profiler.

    recorder = AllocationRecorder("pipefold::mark")
    recorder.start(); recorder.mark(); <work>; recorder.mark()
    deltas, marks = recorder.stop()   # [(time_ns, signed bytes)], [time_ns of each mark], both sorted

torch's CPU allocator keeps no counters (CUDA's has `memory_stats`), but its profiler with
`profile_memory=True` records every allocation and free as a "[memory]" event with signed
bytes; a running sum over them is what the stretch held beyond its start. Marks are empty
profiler ranges whose start times split the stretch. Used by `pipefold train --memory-peaks`
(`pipefold.job.allocator_peaks`) and by the profile's backward temporaries
(`pipefold.runtime.profiling`).

Each session's start and stop make libkineto print a line to the process's stderr ("USDT ...
profiler_start" / "profiler_stop"): the profile opens one session per layer and row count, so a
deep model printed hundreds. The file descriptor is pointed at /dev/null for the start and the
stop only (not the work between them), so nothing the work prints is lost; a line another
thread writes to stderr in that instant would be.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["AllocationRecorder"]


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Fd 2 on /dev/null for the block (libkineto writes to the descriptor, not to sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class AllocationRecorder:
    """One profiler session recording the CPU allocator's events and the times of `mark` calls."""

    def __init__(self, marker: str) -> None:
        self._marker = marker
        self._profile: torch.profiler.profile | None = None

    @property
    def running(self) -> bool:
        return self._profile is not None

    def start(self) -> None:
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                               profile_memory=True)
        with _stderr_silenced():
            self._profile.start()

    def mark(self) -> None:
        """An empty range named by the marker: its start time is the mark's."""
        with torch.profiler.record_function(self._marker):
            pass

    def stop(self) -> tuple[list[tuple[int, int]], list[int]]:
        """Ends the session: the allocator's (time_ns, signed bytes) and the marks' times, sorted."""
        if self._profile is None:
            raise RuntimeError("AllocationRecorder.stop() before start()")
        profile, self._profile = self._profile, None
        with _stderr_silenced():
            profile.stop()
        # The "[memory]" events' signed bytes (`nbytes`) are not in torch's type stubs.
        events: list[Any] = profile.profiler.kineto_results.events()  # type: ignore[union-attr]
        deltas = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]")
        marks = sorted(event.start_ns() for event in events if event.name() == self._marker)
        return deltas, marks
