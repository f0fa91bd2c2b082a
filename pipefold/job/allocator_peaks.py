"""What a rank's allocator held over the training job's kept steps: a CUDA device's caching
allocator, or (opt-in, `pipefold train --memory-peaks`) a CPU rank's allocations as torch's profiler
records them.

    peaks = allocator_peaks(job.device, num_steps)   # None on CPU unless profiled: the loop records nothing
    peaks.before_steps()                             # once, after set-up
    for each step: peaks.step_begins(); <pipeline call>; peaks.pipeline_done(); <update>; peaks.step_ends()
    peaks.summary()                                  # summary.json's memory keys, cuda_* or cpu_*

The planner's memory model is checked on CPU against what the runtime counts (saved-tensor
hooks, tensor bytes); on a GPU the allocator's own peaks (`torch.cuda.memory_stats`) also see
what no hook does: temporaries of the backward and the optimizer update, cuBLAS workspaces,
tensors a side stream keeps alive, and rounding to the allocator's blocks. The first step is
warm-up (lazy optimizer state, first cuBLAS handles, allocator segments), as the report's
median leaves it out; the peaks are reset at the start of each kept step and read at its end,
so a validation or a checkpoint between steps is in none of them. Two reads and one reset per
step, on CUDA only; a CPU run without `--memory-peaks` builds no tracker and the loop's only cost
is `peaks is None`.

On CPU torch keeps no allocator counters: only its profiler, with `profile_memory`, sees each
allocation and free of the CPU allocator, as a "[memory]" event with signed bytes. A profiled
rank (`ProfiledCpuPeaks`) runs one profiler session from before the first step to the end of the
last, and leaves a marker (a `record_function` range) at each call of the loop; at the end it
replays the same `AllocatorPeaks` over the recorded events, with an allocator whose counters are
the running sum of the events up to each marker (`EventTimeline`). The profiler sees nothing
allocated before it started (nor its frees: the counts would stay high by such a free, which
torch logs as "Memory block of unknown size"): the rank's weights, gradients,
buffers and optimizer state then held are counted from their tensors' bytes instead (the job's
data and anything else of its set-up are in no count, as they are off a GPU's allocator). The
profiler records every operator too, which slows the steps (opt-in, and for a few steps: its
events are kept until the run ends).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from pipefold.runtime.allocations import AllocationRecorder
from pipefold.runtime.parallel.tensor_parallel import local

__all__ = [
    "CPU_MEMORY_KEYS", "CUDA_MEMORY_KEYS", "AllocatorPeaks", "AllocatorReading", "CudaAllocator",
    "EventTimeline", "PeakTracker", "ProfiledCpuPeaks", "allocator_peaks", "held_bytes", "held_tensor_bytes",
]

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

CPU_MEMORY_KEYS = (
    "cpu_allocated_before_steps",
    "cpu_allocated_kept_start",
    "cpu_allocated_peak",
    "cpu_allocated_peak_pipeline",
    "cpu_kept_steps",
)
"""summary.json's memory keys of a CPU rank trained with `--memory-peaks` (`ProfiledCpuPeaks`),
the CUDA keys' counterparts in bytes but the last: `cpu_allocated_before_steps` is the bytes of
the weights, gradients, buffers and optimizer state held before the first step (counted from the
tensors: the profiler started after them), and the others add what the profiler saw allocated
and not yet freed since. No reserved peak: the CPU allocator keeps no cache of its own."""


@dataclass(frozen=True)
class AllocatorReading:
    """One read of an allocator's counters, in bytes."""

    allocated: int
    peak_allocated: int
    peak_reserved: int


class Allocator(Protocol):
    """What the tracker reads and resets: a CUDA device's caching allocator (`CudaAllocator`), or
    a profiled CPU rank's recorded allocations replayed (`EventTimeline`)."""

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


class PeakTracker(Protocol):
    """What the loop calls: `before_steps` once, then per step `step_begins`, `pipeline_done` and
    `step_ends`, in that order; `summary` after the steps (summary.json's memory keys)."""

    def before_steps(self) -> None: ...

    def step_begins(self) -> None: ...

    def pipeline_done(self) -> None: ...

    def step_ends(self) -> None: ...

    def summary(self) -> dict[str, int]: ...


class AllocatorPeaks:
    """The peaks of one rank's allocator over the job's kept steps (see the module docstring).

    `num_warmup_steps` first steps are not kept; the loop calls `step_begins`, `pipeline_done`
    and `step_ends` once each per step, in that order. `keys`: the summary's names
    (`CUDA_MEMORY_KEYS`, or `CPU_MEMORY_KEYS`, which have no reserved peak)."""

    def __init__(self, allocator: Allocator, num_warmup_steps: int,
                 keys: Sequence[str] = CUDA_MEMORY_KEYS) -> None:
        self._allocator = allocator
        self._keys = tuple(keys)
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
        """The rank's keys (`CUDA_MEMORY_KEYS` or `CPU_MEMORY_KEYS`; empty where no step was
        kept: a run that did not get past its warm-up has no steady peak to report)."""
        if not self._num_kept or self._before_steps is None or self._kept_start is None:
            return {}
        values = (self._before_steps, self._kept_start, self._peak, self._peak_pipeline,
                  *((self._peak_reserved,) if len(self._keys) == len(CUDA_MEMORY_KEYS) else ()),
                  self._num_kept)
        return dict(zip(self._keys, values, strict=True))


class EventTimeline:
    """An allocator replayed from profiler events: `deltas`, (time in ns, signed bytes) of each
    allocation (+) and free (-), on top of `base` bytes held before the first event.
    `advance_to(time)` applies the events up to and including `time`; `read` and `reset_peaks`
    then act as a caching allocator's counters at that moment."""

    def __init__(self, deltas: Iterable[tuple[int, int]], base: int = 0) -> None:
        self._deltas = sorted(deltas)
        self._times = [time for time, _ in self._deltas]
        self._next = 0
        self._current = self._peak = base

    def advance_to(self, time: int) -> None:
        end = bisect.bisect_right(self._times, time)
        for _, nbytes in self._deltas[self._next:end]:
            self._current += nbytes
            self._peak = max(self._peak, self._current)
        self._next = max(self._next, end)

    def read(self) -> AllocatorReading:
        return AllocatorReading(allocated=self._current, peak_allocated=self._peak, peak_reserved=self._peak)

    def reset_peaks(self) -> None:
        self._peak = self._current


MARKER = "pipefold::allocator_peaks"
"""The name of the profiler range `ProfiledCpuPeaks` leaves at each call of the loop."""


class ProfiledCpuPeaks:
    """A CPU rank's `PeakTracker` (module docstring): torch's profiler with `profile_memory` from
    `before_steps` to the end of the last of `num_steps` steps, a marker at each call, and at
    `summary` the same `AllocatorPeaks` replayed over the recorded events (`CPU_MEMORY_KEYS`).
    `held_before`: the bytes the rank holds when the profiler starts (`held_tensor_bytes` of its
    weights, gradients, buffers and optimizer state), which the profiler cannot see."""

    def __init__(self, num_steps: int, held_before: Callable[[], int]) -> None:
        self._num_steps = num_steps
        self._num_warmup_steps = 1 if num_steps > 1 else 0
        self._held_before = held_before
        self._base = 0
        self._calls: list[Callable[[AllocatorPeaks], None]] = []
        self._recorder = AllocationRecorder(MARKER)
        self._deltas: list[tuple[int, int]] = []
        self._marks: list[int] = []
        self._num_ended = 0

    def _mark(self, call: Callable[[AllocatorPeaks], None]) -> None:
        if not self._recorder.running:
            return
        self._recorder.mark()
        self._calls.append(call)

    def before_steps(self) -> None:
        self._base = self._held_before()
        self._recorder.start()
        self._mark(AllocatorPeaks.before_steps)

    def step_begins(self) -> None:
        self._mark(AllocatorPeaks.step_begins)

    def pipeline_done(self) -> None:
        self._mark(AllocatorPeaks.pipeline_done)

    def step_ends(self) -> None:
        self._mark(AllocatorPeaks.step_ends)
        self._num_ended += 1
        if self._num_ended == self._num_steps:
            self._stop()  # what follows the last step (the final checkpoint) is no part of it

    def _stop(self) -> None:
        if self._recorder.running:
            self._deltas, self._marks = self._recorder.stop()

    def summary(self) -> dict[str, int]:
        self._stop()
        if len(self._marks) != len(self._calls):  # a marker lost: no reading rather than a wrong one
            return {}
        timeline = EventTimeline(self._deltas, base=self._base)
        peaks = AllocatorPeaks(timeline, self._num_warmup_steps, keys=CPU_MEMORY_KEYS)
        for call, time in zip(self._calls, sorted(self._marks), strict=True):
            timeline.advance_to(time)
            call(peaks)
        return peaks.summary()


def held_tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """The bytes of the storages under `tensors` (each once; a tensor-parallel parameter's local
    shard; None skipped): what they hold in the allocator."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        storage = local(tensor).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def held_bytes(pipe: Any, optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """What a rank holds between steps in tensors: the weights, gradients and buffers of `pipe`'s
    stages (a `pipefold.Pipeline`) and the state of its `optimizers` (a ZeRO-sharded optimizer's
    own share)."""
    modules = [module for stage in pipe.stages for module in stage.modules]
    params = [param for module in modules for param in module.parameters()]
    states = [getattr(optimizer, "optim", optimizer).state for optimizer in optimizers]
    return held_tensor_bytes([
        *params, *(param.grad for param in params),
        *(buffer for module in modules for buffer in module.buffers()),
        *(value for state in states for entry in state.values() for value in entry.values()
          if isinstance(value, Tensor)),
    ])


def allocator_peaks(device: torch.device, num_steps: int, allocator: Allocator | None = None,
                    profile_cpu: Callable[[], int] | None = None) -> PeakTracker | None:
    """The tracker of a rank on `device` that runs `num_steps` steps, reading `allocator`
    (default: `device`'s, `CudaAllocator`); on CPU, a `ProfiledCpuPeaks` where `profile_cpu`
    (the bytes held before the steps, `held_tensor_bytes`) is given, else None, as on any other
    device (summary.json's memory then has no cuda_* or cpu_* keys). The first step is warm-up
    unless it is the only one."""
    if device.type == "cpu" and profile_cpu is not None:
        return ProfiledCpuPeaks(num_steps, profile_cpu)
    if device.type != "cuda":
        return None
    return AllocatorPeaks(allocator or CudaAllocator(device), num_warmup_steps=1 if num_steps > 1 else 0)
