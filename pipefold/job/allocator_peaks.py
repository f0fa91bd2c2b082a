"""What a CUDA rank's caching allocator held over the training job's kept steps.

    peaks = allocator_peaks(job.device, num_steps)   # None off CUDA: the loop records nothing
    peaks.before_steps()                             # once, after set-up
    for each step: peaks.step_begins(); <pipeline call>; peaks.pipeline_done(); <update>; peaks.step_ends()
    peaks.summary()                                  # summary.json's memory keys, cuda_*

The planner's memory model is checked on CPU against what the runtime counts (saved-tensor
hooks, tensor bytes); on a GPU the allocator's own peaks (`torch.cuda.memory_stats`) also see
what no hook does: temporaries of the backward and the optimizer update, cuBLAS workspaces,
tensors a side stream keeps alive, and rounding to the allocator's blocks. The first step is
warm-up (lazy optimizer state, first cuBLAS handles, allocator segments), as the report's
median leaves it out; the peaks are reset at the start of each kept step and read at its end,
so a validation or a checkpoint between steps is in none of them. Two reads and one reset per
step, on CUDA only; a CPU run builds no tracker and the loop's only cost is `peaks is None`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["CUDA_MEMORY_KEYS", "AllocatorPeaks", "AllocatorReading", "CudaAllocator", "allocator_peaks"]

CUDA_MEMORY_KEYS = (
    "cuda_allocated_before_steps",
    "cuda_allocated_kept_start",
    "cuda_allocated_peak",
    "cuda_allocated_peak_pipeline",
    "cuda_reserved_peak",
    "cuda_kept_steps",
)
"""summary.json's memory keys of a CUDA rank (absent on any other device), in bytes but the last:

- `cuda_allocated_before_steps`: allocated before the job's first step: the rank's weights
  and whatever set-up placed on the device (a resumed run's optimizer state). A fresh run's
  AdamW creates its state in its first update, so it is not in this number.
- `cuda_allocated_kept_start`: allocated at the start of the first kept step: what the steps
  keep between them (weights, optimizer state, cuBLAS workspaces, buffers the runtime reuses).
- `cuda_allocated_peak`: the most allocated at once during the kept steps, pipeline call and
  optimizer update (`torch.cuda.max_memory_allocated`).
- `cuda_allocated_peak_pipeline`: the same over the kept steps' pipeline calls alone, before
  the update (schedules that update inside the call: the same as the peak).
- `cuda_reserved_peak`: the most the allocator held from the device in segments
  (`torch.cuda.max_memory_reserved`): the allocated peak plus its cache and fragmentation.
  The CUDA context and NCCL's buffers are outside the allocator and in none of these.
- `cuda_kept_steps`: the steps the peaks cover (every step but the first; the only one of a
  one-step run)."""


@dataclass(frozen=True)
class AllocatorReading:
    """One read of an allocator's counters, in bytes."""

    allocated: int
    peak_allocated: int
    peak_reserved: int


class Allocator(Protocol):
    """What the tracker reads and resets: a CUDA device's caching allocator (`CudaAllocator`)."""

    def read(self) -> AllocatorReading: ...

    def reset_peaks(self) -> None: ...


class CudaAllocator:
    """The caching allocator of one CUDA device, through `torch.cuda.memory_stats` (one dict per
    read: the current and peak counters come from the same call)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def read(self) -> AllocatorReading:
        stats = torch.cuda.memory_stats(self.device)
        return AllocatorReading(
            allocated=int(stats.get("allocated_bytes.all.current", 0)),
            peak_allocated=int(stats.get("allocated_bytes.all.peak", 0)),
            peak_reserved=int(stats.get("reserved_bytes.all.peak", 0)),
        )

    def reset_peaks(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


class AllocatorPeaks:
    """The peaks of one rank's allocator over the job's kept steps (see the module docstring).

    `num_warmup_steps` first steps are not kept; the loop calls `step_begins`, `pipeline_done`
    and `step_ends` once each per step, in that order."""

    def __init__(self, allocator: Allocator, num_warmup_steps: int) -> None:
        self._allocator = allocator
        self._num_warmup_steps = num_warmup_steps
        self._num_begun = 0
        self._before_steps: int | None = None
        self._kept_start: int | None = None
        self._peak = 0
        self._peak_pipeline = 0
        self._peak_reserved = 0
        self._num_kept = 0

    @property
    def _kept(self) -> bool:
        return self._num_begun > self._num_warmup_steps

    def before_steps(self) -> None:
        self._before_steps = self._allocator.read().allocated

    def step_begins(self) -> None:
        self._num_begun += 1
        if not self._kept:
            return
        self._allocator.reset_peaks()  # the peak is now what is allocated: the step's own from here
        if self._kept_start is None:
            self._kept_start = self._allocator.read().allocated

    def pipeline_done(self) -> None:
        if self._kept:
            self._peak_pipeline = max(self._peak_pipeline, self._allocator.read().peak_allocated)

    def step_ends(self) -> None:
        if not self._kept:
            return
        reading = self._allocator.read()
        self._peak = max(self._peak, reading.peak_allocated)
        self._peak_reserved = max(self._peak_reserved, reading.peak_reserved)
        self._num_kept += 1

    def summary(self) -> dict[str, int]:
        """The rank's `CUDA_MEMORY_KEYS` (empty where no step was kept: a run that did not get
        past its warm-up has no steady peak to report)."""
        if not self._num_kept or self._before_steps is None or self._kept_start is None:
            return {}
        values = (self._before_steps, self._kept_start, self._peak, self._peak_pipeline,
                  self._peak_reserved, self._num_kept)
        return dict(zip(CUDA_MEMORY_KEYS, values, strict=True))


def allocator_peaks(device: torch.device, num_steps: int, allocator: Allocator | None = None
                    ) -> AllocatorPeaks | None:
    """The tracker of a rank on `device` that runs `num_steps` steps, reading `allocator`
    (default: `device`'s, `CudaAllocator`); None where the device is not CUDA (summary.json's
    memory then has no cuda_* keys). The first step is warm-up unless it is the only one."""
    if device.type != "cuda":
        return None
    return AllocatorPeaks(allocator or CudaAllocator(device), num_warmup_steps=1 if num_steps > 1 else 0)
