"""The pipefold side of a benchmark pair: `pipefold.Pipeline` on the same 8 layers.

pipefold's `step` is the same call on every rank, so every rank passes the batch.
The layers are cut into the pair's stages with explicit, even boundaries, so both
libraries run identical stage modules. A pipefold-only row (auto, auto-v) first tunes
its schedule on the benchmark batch (`tune_schedule`: probe steps, then a search from
their measured costs; docs/decisions.md, "pipefold-only rows") and then runs that.
"""

from __future__ import annotations

import collections
import copy
import time
from typing import Any

import torch
from torch import nn

from benchmarks.harness.layout import stage_bounds
from benchmarks.harness.pairs import SchedulePair
from benchmarks.harness.workloads import Workload
from pipefold.runtime import LayoutOptions, Pipeline, tune_schedule
from pipefold.runtime.measured import measured_cost_model
from pipefold.schedule.io import to_json
from pipefold.simulate import predicted_step_time

__all__ = ["PipefoldSide"]


class PipefoldSide:
    label = "pipefold"
    CALIBRATION_STEPS = 3
    """The calibrated prediction takes its costs from at most this many latest steps."""

    def __init__(
        self,
        workload: Workload,
        layers: list[nn.Module],
        schedule_pair: SchedulePair,
        *,
        num_ranks: int,
        num_microbatches: int,
        probe_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        num_stages = num_ranks * schedule_pair.num_virtual
        layout = LayoutOptions(partition=uniform_partition(num_stages), device=torch.device("cpu"))
        schedule: Any = schedule_pair.schedule
        self.tuned: Any = None
        if schedule_pair.torch_class is None:
            if probe_batch is None:
                raise ValueError(
                    f"{schedule_pair.schedule} searches its schedule on a batch; pass probe_batch"
                )
            self.tuned = tune_schedule(
                copy.deepcopy(layers),
                loss_fn=workload.loss_fn,
                inputs=probe_batch[0],
                targets=probe_batch[1],
                num_microbatches=num_microbatches,
                placement=schedule_pair.layout,
                num_virtual=schedule_pair.num_virtual,
                layout=layout,
            )
            schedule = self.tuned.schedule
        self.pipe: Any = Pipeline(
            copy.deepcopy(layers),
            loss_fn=workload.loss_fn,
            schedule=schedule,
            num_microbatches=num_microbatches,
            num_virtual=schedule_pair.num_virtual,
            layout=layout,
        )
        # The measurements of the latest steps: the warm-up steps when the runner asks for
        # the calibrated prediction (it asks before timing). (GatheredStep, wall seconds of
        # that step on this rank); a step's timeline is decoded only when read, outside the
        # timed window, as a training loop that does not read it would not pay for it.
        self._recent: collections.deque[tuple[Any, float]] = collections.deque(maxlen=self.CALIBRATION_STEPS)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        start = time.perf_counter()
        self.pipe.step(inputs, targets)
        self._recent.append((self.pipe.last_step, time.perf_counter() - start))

    def gradients(self) -> dict[str, torch.Tensor]:
        return {name: p.grad for name, p in self.pipe.named_parameters() if p.grad is not None}

    def zero_grad(self) -> None:
        for parameter in self.pipe.parameters():
            parameter.grad = None

    def activation_bytes_peak(self) -> int | None:
        timeline = self.pipe.last_timeline
        peaks = tuple(getattr(timeline, "activation_bytes_peak", ()))
        rank = int(self.pipe.rank)
        return int(peaks[rank]) if rank < len(peaks) else None

    def calibrated_prediction(self) -> float | None:
        """The simulated step of the schedule that ran, with each stage's F/B/I/W cost and
        the message latency and the runtime's overheads measured in the latest steps (the
        warm-up steps when called before timing; see docs/decisions.md, "measured
        costs"): what `pipefold train` reports as its prediction. It
        carries the ranks' real speeds (two processes on two cores slow each other; cores
        may differ), which a one-process profile cannot see."""
        if not self._recent:
            return None
        schedule = self.pipe.schedule
        timelines = [step.timeline() for step, _ in self._recent]
        walls = [wall for _, wall in self._recent]
        return float(
            predicted_step_time(schedule, measured_cost_model(timelines, schedule, step_times=walls))
        )

    def searched_schedule_json(self) -> dict[str, Any] | None:
        """The schedule that ran, where it was searched (a pipefold-only row), as JSON."""
        if self.tuned is None:
            return None
        return to_json(self.pipe.schedule)

    def timeline_json(self) -> dict[str, Any] | None:
        data: dict[str, Any] = self.pipe.last_timeline.to_json()
        return data


def uniform_partition(num_stages: int) -> list[int]:
    """Layers per stage, the same even split the torch side uses."""
    return [stop - start for start, stop in stage_bounds(num_stages)]
