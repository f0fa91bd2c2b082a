"""Single-process baselines, timed in the parent before the ranks start.

- `accumulate`: one process, 1 thread, the same gradient accumulation over M
  micro-batches a pipeline does (loss of each scaled by its share of the batch). The
  denominator of pipeline efficiency: on CPU, cutting the batch into small kernels
  costs about as much as the bubble, so a pipeline is compared with one
  process that pays the same cost.
- `full batch`: one process with as many threads as the pipeline has ranks, no
  micro-batching: the plain alternative a user would run on this machine.

Each timed step goes through the same quiet gate as the pipelines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from benchmarks.harness.quiet import QuietGate, foreign_share, read_cpu_counters
from benchmarks.harness.stats import summarize
from benchmarks.harness.workloads import Workload

__all__ = ["BaselineResult", "time_accumulation"]


@dataclass
class BaselineResult:
    num_microbatches: int
    num_threads: int
    samples_s: list[float] = field(default_factory=list)
    foreign_shares: list[float] = field(default_factory=list)
    num_disturbed: int = 0

    @property
    def median_s(self) -> float:
        return summarize(self.samples_s).median

    def to_json(self) -> dict[str, Any]:
        return {
            "num_microbatches": self.num_microbatches,
            "num_threads": self.num_threads,
            "samples_s": self.samples_s,
            "foreign_shares": self.foreign_shares,
            "num_disturbed": self.num_disturbed,
            "step_s": summarize(self.samples_s).to_json() if self.samples_s else None,
        }


def _window(run: Callable[[], None]) -> tuple[float, float]:
    """(seconds, foreign CPU share) of one call of `run` in this process."""
    before = read_cpu_counters()
    cpu_before = time.process_time()
    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    own = time.process_time() - cpu_before
    after = read_cpu_counters()
    share = foreign_share(after - before, own) if before is not None and after is not None else 0.0
    return elapsed, share


def time_accumulation(
    work: Workload,
    layers: list[nn.Module],
    num_microbatches: int,
    *,
    num_threads: int = 1,
    warmup_steps: int = 1,
    timed_steps: int = 5,
    gate: QuietGate | None = None,
    seed: int = 0,
) -> BaselineResult:
    """Time forward + backward of the global batch in `num_microbatches` accumulated pieces."""
    gate = gate or QuietGate()
    model = nn.Sequential(*layers)
    inputs, targets = work.make_batch(seed)
    pieces = list(
        zip(inputs.tensor_split(num_microbatches), targets.tensor_split(num_microbatches), strict=True)
    )
    batch_size = inputs.shape[0]

    def step() -> None:
        model.zero_grad()
        for x, y in pieces:
            torch.autograd.backward(work.loss_fn(model(x), y) * (x.shape[0] / batch_size))

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    result = BaselineResult(num_microbatches=num_microbatches, num_threads=num_threads)
    try:
        for _ in range(warmup_steps):
            step()
        for _ in range(timed_steps):
            for _attempt in range(gate.max_retries + 1):
                elapsed, share = _window(step)
                if gate.is_quiet(share):
                    break
            result.samples_s.append(elapsed)
            result.foreign_shares.append(share)
            result.num_disturbed += 0 if gate.is_quiet(share) else 1
    finally:
        torch.set_num_threads(previous_threads)
    return result
