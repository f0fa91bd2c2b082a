"""`Timeline`: what happened (measured) or would happen (simulated), per rank.

The simulator (`pipefold.simulate`) and the runtime (`pipefold.runtime`) both
produce this one type, so a prediction and a measurement are compared like for
like and drawn by the same views. Times are seconds from the start of the step.
No torch import.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pipefold.schedule.ir import Action, Op

__all__ = ["Event", "Wait", "Timeline"]


@dataclass(frozen=True, slots=True)
class Event:
    """One compute action that ran on `rank` from `start` to `end` (seconds)."""

    rank: int
    action: Action
    start: float
    end: float
    step: int = 0
    """Which call of the schedule (training step) this action belongs to, from 0."""

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Wait:
    """Time `rank` spent blocked, waiting for `waiting_for` (e.g. the message feeding F3.7)."""

    rank: int
    waiting_for: Action
    start: float
    end: float
    step: int = 0
    """The step of `waiting_for`."""

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Timeline:
    """Per-rank events and waits of one or more steps, plus memory counters.

    `activation_bytes_peak[rank]` is the peak of activation bytes held on that rank
    (simulated from the cost model, or counted by saved-tensor hooks at run time);
    `weight_versions_peak[rank]` the most versions of one stage's weights a rank held at
    once (1 for flush schedules, more under weight stashing). Events of several steps
    (calls of the schedule) carry their `step` index.
    """

    num_ranks: int
    events: tuple[tuple[Event, ...], ...]
    waits: tuple[tuple[Wait, ...], ...] = ()
    activation_bytes_peak: tuple[int, ...] = ()
    weight_versions_peak: tuple[int, ...] = ()
    source: Literal["simulated", "measured"] = "simulated"
    schedule_name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    weight_bytes_peak: tuple[int, ...] = ()
    """Peak bytes of weights held per rank, stashed versions included (empty when unknown)."""

    def __post_init__(self) -> None:
        if len(self.events) != self.num_ranks:
            raise ValueError(f"events has {len(self.events)} rank rows, num_ranks is {self.num_ranks}")
        if not self.waits:
            object.__setattr__(self, "waits", tuple(() for _ in range(self.num_ranks)))

    # -- metrics -----------------------------------------------------------------------------

    @property
    def start(self) -> float:
        return min((row[0].start for row in self.events if row), default=0.0)

    @property
    def makespan(self) -> float:
        """Time from the first action's start to the last action's end, over all ranks."""
        end = max((event.end for row in self.events for event in row), default=0.0)
        return end - self.start

    def busy_time(self, rank: int) -> float:
        """Seconds `rank` spent computing."""
        return sum(event.duration for event in self.events[rank])

    def wait_time(self, rank: int) -> float:
        return sum(wait.duration for wait in self.waits[rank])

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the ranks' time: 1 - sum(busy) / (num_ranks * makespan)."""
        makespan = self.makespan
        if makespan <= 0:
            return 0.0
        busy = sum(self.busy_time(rank) for rank in range(self.num_ranks))
        return 1.0 - busy / (self.num_ranks * makespan)

    def peak_activations(self, rank: int) -> int:
        """Most micro-batch activations (per stage) held at once on `rank`.

        A (stage, micro-batch) holds activations from the end of its F until the end of
        its B or I (what W keeps is counted in bytes, not here).
        """
        changes: list[tuple[float, int]] = []
        for event in self.events[rank]:
            if event.action.op is Op.F:
                changes.append((event.end, 1))
            elif event.action.op.is_backward:
                changes.append((event.end, -1))
        # Releases before acquisitions at the same instant: a B ending as an F ends frees first.
        changes.sort(key=lambda change: (change[0], change[1]))
        held = peak = 0
        for _, delta in changes:
            held += delta
            peak = max(peak, held)
        return peak

    @property
    def num_steps(self) -> int:
        return 1 + max((event.step for row in self.events for event in row), default=0)

    def step_events(self, step: int) -> tuple[tuple[Event, ...], ...]:
        """Per rank, the events of one step."""
        return tuple(tuple(event for event in row if event.step == step) for row in self.events)

    def steady_state_bubble(self) -> float:
        """Idle share of the last step's period: how full the pipeline runs once warm.

        The period is, over ranks, the longest gap between the end of a rank's work in
        the second-to-last step and the end of its work in the last step; with one step
        this is `bubble_fraction`.
        """
        last = self.num_steps - 1
        if last == 0:
            return self.bubble_fraction
        period = 0.0
        busy = 0.0
        for row in self.events:
            ends = [max((e.end for e in row if e.step == step), default=0.0) for step in (last - 1, last)]
            period = max(period, ends[1] - ends[0])
            busy += sum(event.duration for event in row if event.step == last)
        if period <= 0:
            return 0.0
        return max(0.0, 1.0 - busy / (self.num_ranks * period))

    def summary(self) -> dict[str, Any]:
        """Plain-data metrics for JSON output."""
        return {
            "source": self.source,
            "schedule": self.schedule_name,
            "num_ranks": self.num_ranks,
            "makespan": self.makespan,
            "bubble_fraction": self.bubble_fraction,
            "num_steps": self.num_steps,
            "busy_time": [self.busy_time(rank) for rank in range(self.num_ranks)],
            "wait_time": [self.wait_time(rank) for rank in range(self.num_ranks)],
            "peak_activations": [self.peak_activations(rank) for rank in range(self.num_ranks)],
            "activation_bytes_peak": list(self.activation_bytes_peak),
            "weight_versions_peak": list(self.weight_versions_peak),
            "weight_bytes_peak": list(self.weight_bytes_peak),
        }

    # -- serialization -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "num_ranks": self.num_ranks,
            "source": self.source,
            "schedule_name": self.schedule_name,
            "meta": self.meta,
            "activation_bytes_peak": list(self.activation_bytes_peak),
            "weight_versions_peak": list(self.weight_versions_peak),
            "weight_bytes_peak": list(self.weight_bytes_peak),
            "events": [[[str(e.action), e.start, e.end, e.step] for e in row] for row in self.events],
            "waits": [[[str(w.waiting_for), w.start, w.end, w.step] for w in row] for row in self.waits],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timeline:
        def rows(key: str, kind: type[Event] | type[Wait]) -> tuple[tuple[Any, ...], ...]:
            return tuple(
                # A fourth entry, the step, was added later; three-entry files are step 0.
                tuple(
                    kind(rank, Action.parse(entry[0]), float(entry[1]), float(entry[2]), int(
                        entry[3] if len(entry) > 3 else 0
                    ))
                    for entry in row
                )
                for rank, row in enumerate(data.get(key, []))
            )

        return cls(
            num_ranks=int(data["num_ranks"]),
            events=rows("events", Event),
            waits=rows("waits", Wait),
            activation_bytes_peak=tuple(data.get("activation_bytes_peak", ())),
            weight_versions_peak=tuple(data.get("weight_versions_peak", ())),
            source=data.get("source", "simulated"),
            schedule_name=data.get("schedule_name", ""),
            meta=dict(data.get("meta", {})),
            weight_bytes_peak=tuple(data.get("weight_bytes_peak", ())),
        )

    def dumps(self) -> str:
        return json.dumps(self.to_json())

    @staticmethod
    def merge_ranks(rows: Sequence[Sequence[Event]]) -> tuple[tuple[Event, ...], ...]:
        """Sort each rank's events by start time (runtime gathers them unordered)."""
        return tuple(tuple(sorted(row, key=lambda event: event.start)) for row in rows)
