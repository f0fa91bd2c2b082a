"""`pipefold train --streaming`: the steps of an asynchronous schedule run as streams.

With `schedule.streaming` (pipedream or pipedream-2bw), the loop hands runs of consecutive
steps to `Pipeline.train`, so step k+1's forwards enter while step k's backwards drain and
the pipeline fills and drains once per run instead of once per step. A run ends where the
loop needs the pipeline drained: before a checkpoint (saving drains once; resuming from it
refills), an evaluation, the end of training, or after `MAX_STREAM_STEPS` steps so progress
is reported. The loop asks for each step's batch and loss as before:

    streams = Streams(job, stops={fault_step})
    batches = streams.batches(step)   # this step's batch (the run's are drawn at its first step)
    loss = streams.loss(step)         # runs the stream at its first step
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from torch import Tensor

from pipefold.job.setup import Job
from pipefold.schedule import Schedule, stream

__all__ = ["MAX_STREAM_STEPS", "Streams"]

MAX_STREAM_STEPS = 50
"""The most steps one stream runs before the loop reports them (one drain per this many steps)."""


class Streams:
    """The streams of one training run; see the module docstring."""

    def __init__(self, job: Job, *, stops: Iterable[int | None] = ()) -> None:
        self._job = job
        self._stops = {stop for stop in stops if stop is not None}
        self._batches: dict[int, tuple[Tensor, Tensor]] = {}
        self._losses: dict[int, float] = {}
        self.seconds = 0.0
        """The wall time per step of the latest stream (its time / its steps)."""
        self.started = False
        """Whether the latest `loss` call ran a new stream (its timeline is new)."""
        self.steps = 0
        """Steps of the latest stream."""

    def end_of(self, step: int) -> int:
        """The step (exclusive) where a stream starting at `step` ends."""
        config = self._job.config
        end = min(config.steps, step + MAX_STREAM_STEPS)
        for every in (config.checkpoint_every, config.eval_every):
            if every:
                end = min(end, (step // every + 1) * every)
        for stop in self._stops:
            if step < stop < end:
                end = stop
        return end

    def batches(self, step: int) -> list[tuple[Tensor, Tensor]]:
        """Step `step`'s batch; at a stream's first step every rank draws the stream's batches
        (the same as a step-by-step run draws, so the samplers' states stay alike)."""
        if step not in self._batches:
            self._batches = {k: self._job.next_batch() for k in range(step, self.end_of(step))}
        return [self._batches[step]]

    def loss(self, step: int) -> float:
        """Step `step`'s loss (the mean over the replicas), running its stream at its first step."""
        self.started = step not in self._losses
        if self.started:
            end = self.end_of(step)
            pairs = [self._batches[k] for k in range(step, end)]
            started = time.perf_counter()
            losses = self._job.pipe.train(pairs, steps=len(pairs))
            self.seconds = (time.perf_counter() - started) / len(pairs)
            self.steps = len(pairs)
            self._losses = dict(zip(range(step, end), losses, strict=True))
        return self._losses[step]

    def schedule(self) -> Schedule:
        """The latest stream as one schedule (what its timeline recorded)."""
        s = self._job.pipe.schedule
        return stream(s.name, num_ranks=s.num_ranks, num_microbatches=s.num_microbatches).unroll(self.steps)
