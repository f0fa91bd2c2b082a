"""Feeding a streaming run (`Pipeline.train`): the batches of many steps as one lazy sequence.

A streaming run executes `pipefold.schedule.stream(...).unroll(steps)` once, so its
micro-batch k·m + j is micro-batch j of step k. The executor asks for inputs and targets by
that index; `BatchFeed` pulls step k's (inputs, targets) pair from the caller's iterator the
first time one of its micro-batches is asked for (on the ranks of the first and last stage
only), checks it has the first batch's shape and cuts it into micro-batches, so a run of
any length holds about two batches at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

from pipefold.errors import ConfigError, NonFiniteLoss
from pipefold.model import TensorMeta
from pipefold.runtime.executor import StepInputs
from pipefold.runtime.step_batch import SplitBatch, batch_size, split, split_batch
from pipefold.runtime.transport.comm import Collectives
from pipefold.schedule import STREAMING_FAMILIES, Schedule, ScheduleError, WeightUpdate, lower, stream
from pipefold.schedule.lower import Program
from pipefold.schedule.validate import validate

__all__ = ["BatchFeed", "StreamProgram", "next_pair", "step_losses", "stream_inputs", "stream_program"]


@dataclass(frozen=True)
class StreamProgram:
    """A streaming run of `steps` steps: the unrolled schedule, its lowered program, the timeline
    slots its longest rank needs, and the 2BW weight-version lag (0 for PipeDream)."""

    steps: int
    unrolled: Schedule
    program: Program
    num_slots: int
    version_lag: int


def stream_program(schedule: Schedule, steps: int) -> StreamProgram:
    """The run `Pipeline.train(..., steps=steps)` executes for `schedule`; refused (ConfigError)
    for a bad `steps` or a schedule that cannot stream, alike on every rank."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"train(steps={steps!r}): give the number of optimizer steps, an integer >= 1")
    if schedule.weight_update is WeightUpdate.FLUSH or schedule.name not in STREAMING_FAMILIES:
        raise ConfigError(
            f"train(): schedule {schedule.name!r} is "
            + ("a flush schedule: it drains before every update, so steps cannot overlap"
               if schedule.weight_update is WeightUpdate.FLUSH else "not one of the streaming families")
            + f"; build the Pipeline with schedule='pipedream' or 'pipedream-2bw' (one of "
            f"{', '.join(STREAMING_FAMILIES)}) and ParallelOptions(optimizer=...), or call "
            "step() once per batch and step your optimizer after it"
        )
    try:
        plan = stream(schedule.name, num_ranks=schedule.num_ranks, num_microbatches=schedule.num_microbatches)
    except ScheduleError as error:
        raise ConfigError(f"train(): {error}") from None
    unrolled = plan.unroll(steps)
    validate(unrolled)
    program = lower(unrolled)
    return StreamProgram(
        steps, unrolled, program, max(len(row) for row in program.instructions), plan.version_lag
    )


def next_pair(batches: Iterator[Any], step: int, num_steps: int) -> tuple[Any, Any]:
    """Step `step`'s (inputs, targets) pair from `batches`, refused if it ran out or is no pair."""
    try:
        pair = next(batches)
    except StopIteration:
        raise ConfigError(
            f"train(batches, steps={num_steps}): batches ran out after {step} of {num_steps} steps; "
            f"give at least {num_steps} (inputs, targets) pairs or fewer steps"
        ) from None
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ConfigError(
            f"train(batches, ...): step {step}'s item is {type(pair).__name__}, not an (inputs, targets) "
            "pair; yield (inputs, targets) tuples"
        )
    return pair[0], pair[1]


class BatchFeed:
    """Micro-batches of a streaming run, pulled from `batches` one step at a time."""

    def __init__(
        self,
        batches: Iterator[Any] | None,
        first: SplitBatch,
        *,
        num_steps: int,
        device: torch.device,
    ) -> None:
        self._batches = batches
        self._meta = first.meta
        self._rows = first.size
        self._num_microbatches = len(first.sizes)
        self._num_steps = num_steps
        self._device = device
        self._steps: dict[int, tuple[list[Any] | None, list[Any] | None]] = {
            0: (first.inputs, first.targets)
        }
        self._next = 1
        self.inputs: Sequence[Any] | None = None if first.inputs is None else _Part(self, 0)
        self.targets: Sequence[Any] | None = None if first.targets is None else _Part(self, 1)

    def microbatch(self, part: int, index: int) -> Any:
        step, j = divmod(index, self._num_microbatches)
        if step not in self._steps:
            self._pull(step)
        chunks = self._steps[step][part]
        assert chunks is not None  # only the parts this rank has are handed out
        return chunks[j]

    def _pull(self, step: int) -> None:
        if step != self._next or self._batches is None:
            raise ConfigError(f"train: step {step} was asked for out of order (next is {self._next})")
        inputs, targets = next_pair(self._batches, step, self._num_steps)
        parts: list[list[Any] | None] = [None, None]
        # Both ranks that read the data check what they read: every step must have the
        # first one's shape (the boundary buffers of the whole run are traced from it).
        wanted = (self.inputs is not None, self.targets is not None)
        for index, (value, what) in enumerate(((inputs, "inputs"), (targets, "targets"))):
            if not wanted[index]:
                continue
            if value is None:
                raise ConfigError(f"train: step {step}'s {what} are None on a rank that needs them")
            meta = TensorMeta.of(value, what=what)
            if index == 0 and meta != self._meta:
                raise ConfigError(
                    f"train: step {step}'s inputs are {meta}, step 0's {self._meta}; a streaming run "
                    "needs every batch of one shape (pad them, or call train once per shape)"
                )
            if batch_size(meta) != self._rows:
                raise ConfigError(
                    f"train: step {step}'s {what} have {batch_size(meta)} rows, step 0's inputs "
                    f"{self._rows}; give every step {self._rows} rows"
                )
            parts[index] = split(value, self._num_microbatches, self._device)
        self._steps[step] = (parts[0], parts[1])
        self._next = step + 1
        # The forwards of steps before the previous one have all run on this rank.
        self._steps.pop(step - 2, None)


class _Part(Sequence[Any]):
    """The inputs (part 0) or targets (part 1) of every micro-batch of the run, by index."""

    def __init__(self, feed: BatchFeed, part: int) -> None:
        self._feed = feed
        self._part = part

    def __len__(self) -> int:
        return self._feed._num_steps * self._feed._num_microbatches

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return self._feed.microbatch(self._part, index)


def stream_inputs(
    rank: int,
    schedule: Schedule,
    batches: Iterable[tuple[Any, Any]] | None,
    steps: int,
    collectives: Collectives | None,
    device: torch.device,
    boundaries: Callable[[TensorMeta, int], list[TensorMeta]],
) -> tuple[StepInputs, int]:
    """(what the executor needs for a streaming run of `steps` steps, the rows of one step's
    batch): the first step's batch is read and its shape broadcast, the later ones are pulled
    by `BatchFeed` as their micro-batches are asked for."""
    reads = rank in (schedule.placement[0], schedule.placement[-1])
    if reads and batches is None:
        raise ConfigError(
            f"train(batches=None) on rank {rank}, which holds the first or last stage; "
            "pass an iterable of (inputs, targets) pairs there"
        )
    iterator = iter(batches) if reads and batches is not None else None
    inputs, targets = next_pair(iterator, 0, steps) if iterator is not None else (None, None)
    batch = split_batch(rank, schedule, inputs, targets, collectives, device, caller="train")
    if batch.parts is not None:  # every rank knows it from the broadcast description
        raise ConfigError(
            "train(): a streaming run takes every step's batch as one tensor of one shape, not "
            "Microbatches; call step() once per batch for micro-batches of different shapes"
        )
    feed = BatchFeed(iterator, batch, num_steps=steps, device=device)
    every_boundary = [boundaries(batch.meta, size) for size in batch.sizes] * steps
    scales = [size / batch.size for size in batch.sizes] * steps
    return StepInputs(feed.inputs, feed.targets, every_boundary, scales), batch.size


def step_losses(losses: Tensor, steps: int, num_microbatches: int) -> list[float]:
    """Each step's batch-mean loss from a streaming run's micro-batch losses (each already
    scaled by its share of the batch); a non-finite one raises NonFiniteLoss."""
    per_step = losses.reshape(steps, num_microbatches).sum(dim=1)
    bad = [k for k, finite in enumerate(torch.isfinite(per_step).tolist()) if not finite]
    if bad:
        raise NonFiniteLoss(
            f"the loss of step(s) {bad} of the streaming run is {per_step[bad[0]].item()}; the weights "
            "were updated from it inside the run and cannot be restored: lower the learning rate or "
            "check the data, and reload a checkpoint"
        )
    return [float(value) for value in per_step.tolist()]
