"""Re-tuning the schedule during training: search an order from the run's own costs, try it, keep it
only if the steps that follow are faster (`pipefold train --set schedule.retune_every=N`).

    retuner = Retuner(pipe, every=N, console)          # on every rank
    if retuner.due(done, num_steps): retuner.after_steps(done, recent_timelines, step_seconds)

How and why the switch is a trial: docs/decisions.md, "re-tuning during training".
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from pipefold.errors import PipefoldError
from pipefold.plan import find_schedule
from pipefold.runtime.measured import measured_cost_model
from pipefold.schedule import Schedule
from pipefold.schedule.io import from_json, to_json
from pipefold.schedule.placement import layout_of
from pipefold.simulate import simulate
from pipefold.timeline import Timeline

if TYPE_CHECKING:
    from rich.console import Console

    from pipefold.runtime import Pipeline

__all__ = ["RETUNE_GAIN", "Retuner"]

RETUNE_GAIN = 0.02
"""A found order is tried only where its predicted step is this much shorter than the running one's."""

SEARCH_BUDGET_S = 0.5
"""Seconds rank 0 may search for an order each time."""


class Retuner:
    """Decides, every `every` steps, whether the pipeline runs another order (docs/decisions.md,
    "re-tuning during training"). Call `after_steps` on every rank at the same steps."""

    def __init__(self, pipe: Pipeline, every: int, console: Console | None = None) -> None:
        self._pipe = pipe
        self._every = every
        self._console = console
        self._trial: dict[str, Any] | None = None
        """The last switch, until the steps after it have been measured."""
        self._previous: Schedule | None = None
        self._stopped = False
        self.changes: list[dict[str, Any]] = []
        """One record per switch: step, from, to, predictions, measurements, kept."""

    def due(self, done: int, num_steps: int) -> bool:
        """Whether to act after `done` steps (never after the last one)."""
        return not self._stopped and done % self._every == 0 and done < num_steps

    def after_steps(self, done: int, timelines: Sequence[Timeline], walls: Sequence[float]) -> bool:
        """Judge the running trial, or search for one; True where the running order changed.
        `timelines` are the latest steps' (since the last change), `walls` every step's seconds."""
        recent = list(walls[-self._every :])
        if self._trial is not None:
            return self._judge(recent)
        measured = list(timelines)[-self._every :]
        change = self._search(done, measured, walls[-len(measured) :] if measured else [])
        if change is None:
            return False
        self._previous = self._pipe.schedule
        self._pipe.use_schedule(from_json(change.pop("schedule")))
        change["measured_before_s"] = statistics.median(recent)
        self._trial = change
        self.changes.append(change)
        self._say(
            f"step {done}: trying {change['from']} -> {change['to']}, predicted "
            f"{change['predicted_before_s'] * 1e3:.0f} -> {change['predicted_after_s'] * 1e3:.0f} ms from "
            f"the last {len(measured)} steps' costs"
        )
        return True

    def _judge(self, recent: list[float]) -> bool:
        assert self._trial is not None and self._previous is not None
        trial, self._trial = self._trial, None
        # Rank 0's clock decides for every rank, as the search does.
        after = statistics.median(recent)
        verdict: list[Any] = [(after, trial["measured_before_s"], after < trial["measured_before_s"])]
        _broadcast(verdict)
        after, trial["measured_before_s"], trial["kept"] = verdict[0]
        trial["measured_after_s"] = after
        if trial["kept"]:
            self._say(
                f"kept {trial['to']}: {trial['measured_before_s'] * 1e3:.0f} -> {after * 1e3:.0f} ms measured"
            )
            return False
        self._pipe.use_schedule(self._previous)
        self._stopped = True
        self._say(
            f"back to {trial['from']}: {trial['to']} ran {after * 1e3:.0f} ms against "
            f"{trial['measured_before_s'] * 1e3:.0f} ms; re-tuning stops for this run"
        )
        return True

    def _search(
        self, done: int, timelines: list[Timeline], walls: Sequence[float]
    ) -> dict[str, Any] | None:
        schedule = self._pipe.schedule
        payload: list[Any] = [None]
        if _rank() == 0 and timelines:
            try:
                payload = [self._found(done, schedule, timelines, walls)]
            except PipefoldError as error:  # the others wait at the broadcast: answer them
                self._say(f"step {done}: no re-tuning, the search failed: {error}")
        _broadcast(payload)  # every replica and tp peer runs the same order
        change: dict[str, Any] | None = payload[0]
        return None if change is None else dict(change)

    def _found(
        self, done: int, schedule: Schedule, timelines: list[Timeline], walls: Sequence[float]
    ) -> dict[str, Any] | None:
        """Rank 0: the change to try, or None where no order is predicted `RETUNE_GAIN` faster."""
        costs = measured_cost_model(timelines, schedule, step_times=list(walls))
        num_virtual = schedule.num_stages // schedule.num_ranks
        layout = layout_of(schedule.placement, schedule.num_ranks, num_virtual)
        assert layout is not None  # TrainConfig checked it
        found = find_schedule(
            costs, num_ranks=schedule.num_ranks, num_microbatches=schedule.num_microbatches,
            num_virtual=num_virtual, placement=layout, time_budget_s=SEARCH_BUDGET_S,
        )
        before, after = simulate(schedule, costs).makespan, simulate(found, costs).makespan
        if after >= before * (1 - RETUNE_GAIN):
            return None
        return {
            "step": done, "from": schedule.name, "to": found.name, "schedule": to_json(found),
            "predicted_before_s": before + costs.step_overhead,
            "predicted_after_s": after + costs.step_overhead,
        }

    def _say(self, text: str) -> None:
        if self._console is not None:
            self._console.print(text)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _broadcast(payload: list[Any]) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
