"""Running each batch as the adaptive chooser says (`pipefold.plan.adaptive`): switch a built
Pipeline to another flush family of its placement, micro-batch count and recomputation.

    runner = AdaptiveRunner(pipe, chooser)      # on every rank, the same chooser
    choice = runner.prepare(inputs)             # before pipe.step(inputs, targets)
    loss = pipe.step(inputs, targets)
    runner.finish(choice)                       # feeds the measured step to the re-check
    loss = runner.step(inputs, targets)         # the three at once

Build the Pipeline with the most micro-batches any choice uses (its transport is sized for them);
the switch keeps every stage, weight and optimizer state (`Pipeline.use_schedule`), so the run
stays exact whatever each batch runs as. The re-check reads the pipeline's gathered timeline,
the same on every rank of one pipeline; with data-parallel replicas or tensor-parallel peers
(each of which runs its own pipeline and measures its own steps) the step counted is the
slowest pipeline's (`agreed_step_s`, a max over "dp" then "tp"), so every rank of every
replica and tp peer keeps the same choice.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipefold.errors import ConfigError, PipelineError
from pipefold.plan.adaptive import AdaptiveChoice, AdaptiveChooser
from pipefold.plan.orders import family_schedule
from pipefold.runtime.pipeline import Pipeline

__all__ = ["AdaptiveRunner", "agreed_step_s"]


class AdaptiveRunner:
    """Applies `chooser`'s choice for each batch to `pipe`, and reports each step back to it."""

    def __init__(self, pipe: Pipeline, chooser: AdaptiveChooser) -> None:
        if any(stage.stash is not None for stage in pipe.stages):
            raise ConfigError(
                f"adaptive choice with schedule {pipe.schedule.name!r}: it updates weights inside the step; "
                "use a flush schedule"
            )
        self.pipe = pipe
        self.chooser = chooser
        self._running: tuple[str, int, str] | None = None
        self.switched = False
        """Whether the last `prepare` changed what the pipeline runs."""
        self.num_switches = 0
        """How many `prepare` calls changed what the pipeline runs."""

    def prepare(self, inputs: Any) -> AdaptiveChoice:
        """Choose for a batch of `inputs` (rows x sequence length, batch first) and switch to it."""
        shape = tuple(getattr(inputs, "shape", ()))
        if len(shape) < 2:
            raise ConfigError(
                f"adaptive choice needs batches of rows x sequence length; got inputs of shape {list(shape)}"
            )
        choice = self.chooser.choose(int(shape[0]), int(shape[1]))
        wanted = (choice.schedule, choice.num_microbatches, choice.recompute)
        self.switched = wanted != self._running
        if self.switched:
            space = self.chooser.space
            schedule = family_schedule(
                choice.schedule, space.num_ranks, choice.num_microbatches, space.num_virtual
            )
            for stage in self.pipe.stages:
                stage.set_recompute(choice.recompute == "full")
            self.pipe.use_schedule(schedule)
            self._running = wanted
            self.num_switches += 1
        return choice

    def step(self, inputs: Any, targets: Any) -> Any:
        """`pipe.step(inputs, targets)` run as the chooser says for this batch, its measured step
        fed back: one pipeline call (of gradient accumulation's several, each chooses for its
        own batch: the gradients add up alike whatever each call ran as)."""
        choice = self.prepare(inputs)
        loss = self.pipe.step(inputs, targets)
        self.finish(choice)
        return loss

    def forget(self) -> None:
        """The pipeline was switched outside this runner: the next `prepare` applies its choice again."""
        self._running = None

    def finish(self, choice: AdaptiveChoice) -> None:
        """The step run as `choice` is done: its measured step (the gathered timeline's) goes to
        the re-check."""
        timeline = self.pipe.last_timeline
        if timeline is None:
            raise PipelineError(
                "adaptive choice re-checks against measured steps; build the pipeline with "
                "RuntimeOptions(record_timeline=True)"
            )
        self.chooser.observe(choice, agreed_step_s(self.pipe, timeline.makespan))


def agreed_step_s(pipe: Pipeline, step_s: float) -> float:
    """The slowest of the pipelines that share each step: `step_s` (this pipeline's measured
    step, the same on its every rank) maxed over the data-parallel replicas, then over the
    tensor-parallel peers, so every rank of each gets the same value (a max is exact in any
    order). The step ends when the slowest pipeline's does, and a choice every rank applies
    must be judged on one number. Without replicas or peers: `step_s`."""
    groups = [
        (group, what) for group, what in (
            (pipe.data_parallel_group, "adaptive step agreement over the data-parallel replicas"),
            (pipe.tensor_parallel_group, "adaptive step agreement over the tensor-parallel peers"),
        ) if group is not None
    ]
    if not groups:
        return step_s
    value = torch.tensor([step_s], dtype=torch.float64, device=pipe.device)
    for group, what in groups:
        work = dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group, async_op=True)
        pipe.watchdog.wait(work, what=what, peer=None)
    return float(value.item())
