"""pipefold.job.allocator_peaks: which steps a rank's allocator peaks cover, on a scripted CUDA
allocator (no GPU here) and a profiled CPU rank's real allocations, and the report's line of them."""

from __future__ import annotations

import pytest
import torch

from pipefold.job.allocator_peaks import (
    CPU_MEMORY_KEYS,
    CUDA_MEMORY_KEYS,
    AllocatorPeaks,
    AllocatorReading,
    EventTimeline,
    ProfiledCpuPeaks,
    allocator_peaks,
    held_tensor_bytes,
)
from pipefold.job.report import _allocator_line, _memory_line
from pipefold.runtime.allocations import AllocationRecorder

MiB = 2**20


class ScriptedAllocator:
    """A caching allocator's counters as the test drives them: `alloc`/`free` move the current
    bytes (and the peak); reserved segments only grow, as a cache's do."""

    def __init__(self) -> None:
        self.current = self.peak = self.reserved = self.peak_reserved = 0
        self.num_resets = 0
        self.has_optimizer_state = False

    def alloc(self, size: int) -> None:
        self.current += size
        self.peak = max(self.peak, self.current)
        self.reserved = max(self.reserved, self.current)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, size: int) -> None:
        self.current -= size

    def read(self) -> AllocatorReading:
        return AllocatorReading(self.current, self.peak, self.peak_reserved)

    def reset_peaks(self) -> None:
        self.num_resets += 1
        self.peak, self.peak_reserved = self.current, self.reserved


def _step(allocator: ScriptedAllocator, peaks: AllocatorPeaks, activations: int, update_temp: int,
          between: int = 0) -> None:
    """One job step: the pipeline call holds `activations` and then gradients of 10; the update
    makes its optimizer state of 20 once and a temporary of `update_temp`; after the step, a
    validation or checkpoint of `between` bytes comes and goes."""
    peaks.step_begins()
    allocator.alloc(activations)
    allocator.alloc(10)  # gradients
    allocator.free(activations)
    peaks.pipeline_done()
    if not allocator.has_optimizer_state:
        allocator.alloc(20)  # AdamW's state, made in its first update
        allocator.has_optimizer_state = True
    allocator.alloc(update_temp)
    allocator.free(update_temp)
    allocator.free(10)  # zero_grad(set_to_none=True)
    peaks.step_ends()
    allocator.alloc(between)
    allocator.free(between)


def test_a_cpu_rank_has_no_tracker_so_summary_json_gets_no_cuda_keys():
    assert allocator_peaks(torch.device("cpu"), num_steps=5) is None
    assert allocator_peaks(torch.device("meta"), num_steps=5) is None


def test_the_first_step_and_what_runs_between_steps_are_in_no_peak():
    allocator = ScriptedAllocator()
    allocator.alloc(100)  # weights
    peaks = allocator_peaks(torch.device("cuda", 0), num_steps=3, allocator=allocator)
    assert peaks is not None
    peaks.before_steps()
    _step(allocator, peaks, activations=500, update_temp=5, between=1000)  # warm-up: the largest
    _step(allocator, peaks, activations=40, update_temp=5, between=1000)   # an evaluation after it
    _step(allocator, peaks, activations=30, update_temp=60)
    summary = peaks.summary()
    assert list(summary) == list(CUDA_MEMORY_KEYS)
    assert summary["cuda_allocated_before_steps"] == 100           # no optimizer state yet
    assert summary["cuda_allocated_kept_start"] == 120             # weights + the state the warm-up made
    assert summary["cuda_allocated_peak_pipeline"] == 120 + 40 + 10  # step 2's call, not the warm-up's
    assert summary["cuda_allocated_peak"] == 120 + 10 + 60         # step 3's update temporary
    # Reserved segments never shrink: the warm-up's and the evaluation's cache stays reserved.
    assert summary["cuda_reserved_peak"] == 100 + 1000 + 20
    assert summary["cuda_kept_steps"] == 2
    assert allocator.num_resets == 2  # once per kept step, at its start


def test_a_one_step_run_keeps_its_only_step():
    allocator = ScriptedAllocator()
    peaks = allocator_peaks(torch.device("cuda"), num_steps=1, allocator=allocator)
    assert peaks is not None
    peaks.before_steps()
    _step(allocator, peaks, activations=70, update_temp=0)
    assert peaks.summary()["cuda_allocated_peak"] == 70 + 10
    assert peaks.summary()["cuda_kept_steps"] == 1


def test_a_run_stopped_in_its_warm_up_reports_nothing():
    allocator = ScriptedAllocator()
    peaks = AllocatorPeaks(allocator, num_warmup_steps=1)
    peaks.before_steps()
    _step(allocator, peaks, activations=70, update_temp=0)
    assert peaks.summary() == {}


def _entry(world_rank: int, replica: int, **cuda: int) -> dict[str, int]:
    entry = {"world_rank": world_rank, "pipeline_rank": world_rank % 2, "replica": replica,
             "weights": 2 * MiB, "optimizer": 4 * MiB, "activations_peak": MiB, "casts": 0}
    return {**entry, **cuda}


def test_the_report_prints_the_allocator_line_on_cuda_only():
    cpu = [_entry(1, 0), _entry(0, 0)]
    assert _allocator_line(cpu) is None
    assert _memory_line(cpu).startswith("memory per rank (MiB), replica 0: weights 2.00 / 2.00")
    cuda = {
        "cuda_allocated_before_steps": 2 * MiB, "cuda_allocated_kept_start": 6 * MiB,
        "cuda_allocated_peak": 10 * MiB, "cuda_allocated_peak_pipeline": 9 * MiB,
        "cuda_reserved_peak": 12 * MiB, "cuda_kept_steps": 2,
    }
    # Rank 1 reports more; a second replica's ranks are left out, as in the memory line.
    memory = [_entry(1, 0, **{**cuda, "cuda_allocated_peak": 11 * MiB}), _entry(0, 0, **cuda),
              _entry(2, 1, **{**cuda, "cuda_allocated_peak": 99 * MiB})]
    assert _allocator_line(memory) == (
        "CUDA allocator per rank (MiB), replica 0, 2 kept steps: peak allocated 10.0 / 11.0 "
        "(pipeline call 9.0 / 9.0), peak reserved 12.0 / 12.0; allocated before the first step "
        "2.0 / 2.0, between steps 6.0 / 6.0"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads a CUDA device's allocator")
def test_on_a_gpu_the_kept_peak_is_the_kept_steps_own_allocation():
    device = torch.device("cuda", torch.cuda.current_device())
    peaks = allocator_peaks(device, num_steps=2)
    assert peaks is not None
    weights = torch.empty(MiB // 4, device=device)  # 1 MiB of fp32, held through the steps
    peaks.before_steps()
    for temporary_mib in (64, 8):  # the warm-up's larger temporary is in no peak
        peaks.step_begins()
        temporary = torch.empty(temporary_mib * MiB // 4, device=device)
        del temporary
        peaks.pipeline_done()
        peaks.step_ends()
    summary = peaks.summary()
    assert summary["cuda_allocated_kept_start"] == summary["cuda_allocated_before_steps"]
    # Blocks of a MiB multiple are not rounded up: the peak is the kept step's 8 MiB exactly.
    assert summary["cuda_allocated_peak"] - summary["cuda_allocated_kept_start"] == 8 * MiB
    assert summary["cuda_allocated_peak_pipeline"] == summary["cuda_allocated_peak"]
    assert summary["cuda_reserved_peak"] >= summary["cuda_allocated_peak"]
    assert summary["cuda_allocated_before_steps"] >= weights.nbytes
    assert summary["cuda_kept_steps"] == 1


def test_a_profiled_cpu_rank_replays_its_allocations_at_each_call_of_the_loop():
    """Real allocations under torch's profiler, in one process: the weights (held before the
    profiler starts) counted from their tensors, the warm-up step's larger temporary and the
    evaluation between steps in no peak, the update's temporary in the step's peak only."""
    weights = torch.empty(1000, dtype=torch.uint8)
    peaks = allocator_peaks(torch.device("cpu"), num_steps=3,
                            profile_cpu=lambda: held_tensor_bytes([weights]))
    assert isinstance(peaks, ProfiledCpuPeaks)
    peaks.before_steps()
    state: list[torch.Tensor] = []
    for activations, update_temp, between in ((50_000, 10, 0), (4000, 300, 70_000), (3000, 6000, 0)):
        peaks.step_begins()
        held = torch.empty(activations, dtype=torch.uint8)
        grads = torch.empty(100, dtype=torch.uint8)
        del held
        peaks.pipeline_done()
        if not state:
            state.append(torch.empty(200, dtype=torch.uint8))  # the optimizer's state, made once
        temporary = torch.empty(update_temp, dtype=torch.uint8)
        del temporary, grads
        peaks.step_ends()
        evaluation = torch.empty(between, dtype=torch.uint8)
        del evaluation
    summary = peaks.summary()
    assert summary == {
        "cpu_allocated_before_steps": 1000,
        "cpu_allocated_kept_start": 1000 + 200,
        "cpu_allocated_peak": 1000 + 200 + 100 + 6000,       # step 3's update temporary
        "cpu_allocated_peak_pipeline": 1000 + 200 + 4000 + 100,  # step 2's call, not the warm-up's
        "cpu_kept_steps": 2,
    }
    assert list(summary) == list(CPU_MEMORY_KEYS)


def test_an_event_timeline_reads_as_an_allocator_at_each_time():
    timeline = EventTimeline([(30, -5), (10, 8), (20, 4)], base=100)  # out of order: sorted by time
    timeline.advance_to(20)
    assert timeline.read() == AllocatorReading(112, 112, 112)
    timeline.reset_peaks()
    timeline.advance_to(30)
    assert timeline.read() == AllocatorReading(107, 112, 112)


def test_held_tensor_bytes_counts_a_shared_storage_once():
    base = torch.zeros(10)
    assert held_tensor_bytes([base, base[2:], None, torch.zeros(3, dtype=torch.float64)]) == 40 + 24


def test_the_report_prints_a_profiled_cpu_ranks_allocations_without_a_reserved_peak():
    cpu = {"cpu_allocated_before_steps": 2 * MiB, "cpu_allocated_kept_start": 6 * MiB,
           "cpu_allocated_peak": 10 * MiB, "cpu_allocated_peak_pipeline": 9 * MiB, "cpu_kept_steps": 1}
    assert _allocator_line([_entry(0, 0, **cpu)]) == (
        "CPU allocations per rank (MiB), replica 0, 1 kept step: peak allocated 10.0 (pipeline call 9.0); "
        "allocated before the first step 2.0, between steps 6.0"
    )


def test_allocation_recorder_records_marks_and_bytes_and_keeps_kineto_off_stderr(
        capfd: pytest.CaptureFixture[str]) -> None:
    recorder = AllocationRecorder("pipefold::test_mark")
    recorder.start()
    recorder.mark()
    block = torch.empty(1024, dtype=torch.float32)
    del block
    recorder.mark()
    deltas, marks = recorder.stop()
    assert not recorder.running
    assert len(marks) == 2
    between = [nbytes for time_ns, nbytes in deltas if marks[0] <= time_ns <= marks[1]]
    assert 4096 in between and -4096 in between
    assert "profiler_start" not in capfd.readouterr().err
