"""Running each batch as the adaptive chooser says (`pipefold.plan.adaptive`): switch a built
Pipeline to another flush family of its placement, micro-batch count and recomputation.

    runner = AdaptiveRunner(pipe, chooser)      # on every rank, the same chooser
    choice = runner.prepare(inputs)             # before pipe.step(inputs, targets)
    loss = pipe.step(inputs, targets)
    runner.finish(choice)                       # feeds the measured step to the re-check

Build the Pipeline with the most micro-batches any choice uses (its transport is sized for them);
the switch keeps every stage, weight and optimizer state (`Pipeline.use_schedule`), so the run
stays exact whatever each batch runs as. The re-check reads the pipeline's gathered timeline,
the same on every rank of the pipeline, so every rank keeps the same choice.
"""

from __future__ import annotations

from typing import Any

from pipefold.errors import ConfigError, PipelineError
from pipefold.plan.adaptive import AdaptiveChoice, AdaptiveChooser
from pipefold.plan.orders import family_schedule
from pipefold.runtime.pipeline import Pipeline

__all__ = ["AdaptiveRunner"]


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
        return choice

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
        self.chooser.observe(choice, timeline.makespan)
