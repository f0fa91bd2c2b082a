"""Step recording: every rank's measured events and losses, gathered into one `Timeline`.

    recorder = StepRecorder(collectives, schedule, slots, partition=..., device_type=..., shared_cores=...)
    gathered, losses = recorder.gather(record, weight_versions_peak)   # collective, once per step
    timeline = gathered.timeline()                                      # decoded when read

One all-gather brings every rank's losses and packed measurements (step_gather.py); the
timeline is assembled from them only when someone reads it.
"""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any, TypeVar

from torch import Tensor

from pipefold.runtime import step_gather
from pipefold.runtime.executor import StepRecord
from pipefold.runtime.step_gather import GatheredStep, RankRecord, host_code
from pipefold.runtime.transport.comm import Collectives
from pipefold.schedule import Schedule
from pipefold.timeline import Event, Timeline, Wait

__all__ = ["StepRecorder"]

EventOrWait = TypeVar("EventOrWait", Event, Wait)


class StepRecorder:
    """Gathers one step's measurements from every rank of the pipeline and builds its timeline."""

    def __init__(
        self,
        collectives: Collectives | None,
        schedule: Schedule,
        slots: int,
        *,
        partition: str,
        device_type: str,
        shared_cores: float | None,
    ) -> None:
        self._collectives = collectives
        self.schedule = schedule
        self.slots = slots
        """Events and waits of any rank fit in this many slots (the longest program's actions)."""
        self._partition = partition
        self._device_type = device_type
        self._shared_cores = shared_cores
        self._host = host_code(socket.gethostname())

    def use(self, schedule: Schedule, slots: int) -> None:
        """Record steps of `schedule` (same layout) from now on (`Pipeline.use_schedule`)."""
        self.schedule = schedule
        self.slots = slots

    def gather(self, record: StepRecord, weight_versions_peak: int) -> tuple[GatheredStep, Tensor]:
        """Every rank's measurements and the batch's per-micro-batch losses (summed over ranks)."""
        host = self._host
        if self._collectives is None:
            return GatheredStep(
                lambda: self.timeline(
                    [
                        RankRecord(
                            events=record.events,
                            waits=record.waits,
                            activation_bytes_peak=record.activation_bytes_peak,
                            weight_versions_peak=weight_versions_peak,
                            origin=record.origin,
                            host=host,
                        )
                    ]
                )
            ), record.losses
        slots = self.slots
        row = step_gather.pack_stamps(
            record.event_stamps,
            record.wait_stamps,
            activation_bytes_peak=record.activation_bytes_peak,
            weight_versions_peak=weight_versions_peak,
            origin=record.origin,
            host=host,
            losses=record.losses,
            num_slots=slots,
            event_table=record.event_table,
        )
        rows = self._collectives.all_gather(row, what="loss and timeline gather")
        losses = step_gather.losses_of(rows, slots, self.schedule.num_microbatches)
        return GatheredStep(lambda: self.timeline(step_gather.unpack(rows, slots))), losses

    def timeline(self, gathered: list[RankRecord]) -> Timeline:
        """The step's timeline from every rank's record."""
        events: list[tuple[Event, ...]] = [g.events for g in gathered]
        waits: list[tuple[Wait, ...]] = [g.waits for g in gathered]
        one_clock = len({g.host for g in gathered}) == 1
        if one_clock:
            # One machine: perf_counter is the same monotonic clock in every process, so
            # the ranks' timelines are put on one time axis (across machines each rank keeps
            # its own step start as zero).
            first = min(g.origin for g in gathered)
            shifts = [g.origin - first for g in gathered]
            events = [tuple(_shift(e, d) for e in row) for row, d in zip(events, shifts, strict=True)]
            waits = [tuple(_shift(w, d) for w in row) for row, d in zip(waits, shifts, strict=True)]
        meta: dict[str, Any] = {
            "num_microbatches": self.schedule.num_microbatches,
            "partition": self._partition,
            "device": self._device_type,
            # Whether event times of different ranks compare (measured_link needs it).
            "clock": "shared" if one_clock else "per-rank",
        }
        if one_clock and self._shared_cores is not None:
            meta["num_cores"] = self._shared_cores
        return Timeline(
            num_ranks=len(gathered),
            events=Timeline.merge_ranks(events),
            waits=tuple(waits),
            activation_bytes_peak=tuple(g.activation_bytes_peak for g in gathered),
            weight_versions_peak=tuple(g.weight_versions_peak for g in gathered),
            source="measured",
            schedule_name=self.schedule.name,
            meta=meta,
        )


def _shift(item: EventOrWait, delta: float) -> EventOrWait:
    return replace(item, start=item.start + delta, end=item.end + delta)
