"""One collective at the end of a step: every rank's losses and measured timeline, as numbers.

Every field of a rank's record is a number or an action (op, stage, micro-batch), so the
whole record fits a float64 row whose length every rank knows from the schedule:

    [num_events, num_waits, activation_peak, weight_versions, origin, host,
     events: (op, stage, microbatch, start, end) x num_slots,
     waits:  (op, stage, microbatch, start, end) x num_slots,
     losses: num_microbatches]

One `all_gather` of that row gives every rank the losses (the sum of the rows' loss
columns: only the last stage's rank has non-zero ones, so the sum is exact) and the
timeline. float64 holds every field exactly: byte counts below 2**53, hosts as a CRC-32,
times as the seconds `perf_counter` gave. `GatheredStep` keeps the rows and decodes them
into a `Timeline` on first read, so a loop that never reads it does not pay for decoding.
Why one numeric gather: docs/decisions.md, "One gather per step".
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipefold.errors import PipelineError
from pipefold.schedule import Action, Op
from pipefold.timeline import Event, Timeline, Wait

__all__ = [
    "EVENT_FIELDS", "GatheredStep", "RankRecord", "host_code", "losses_of", "op_code", "pack", "pack_stamps",
    "row_length", "unpack",
]

_HEADER = 6
_FIELDS = 5
_OPS: tuple[Op, ...] = tuple(Op)
_OP_CODE = {op: float(code) for code, op in enumerate(_OPS)}
EVENT_FIELDS = _FIELDS
"""Numbers per event in a row: op code, stage, micro-batch, start, end."""


def op_code(op: Op) -> float:
    """`op`'s number in a row."""
    return _OP_CODE[op]


@dataclass(frozen=True)
class RankRecord:
    """What one rank measured in one step."""

    events: tuple[Event, ...]
    waits: tuple[Wait, ...]
    activation_bytes_peak: int
    weight_versions_peak: int
    origin: float
    """The rank's `perf_counter` at the step's start (event times are relative to it)."""
    host: int
    """`host_code` of the rank's machine."""


def host_code(hostname: str) -> int:
    """A number that is equal for equal host names (CRC-32; collisions only mis-align plots)."""
    return zlib.crc32(hostname.encode())


def row_length(num_slots: int, num_microbatches: int) -> int:
    return _HEADER + 2 * _FIELDS * num_slots + num_microbatches


Stamp = tuple[Action, float, float]
"""(action, start, end): an event or a wait as the executor records it."""


def pack(record: RankRecord, losses: Tensor, num_slots: int) -> Tensor:
    """This rank's row (on `losses`' device); `num_slots` bounds events and waits alike."""
    return pack_stamps(
        [(e.action, e.start, e.end) for e in record.events],
        [(w.waiting_for, w.start, w.end) for w in record.waits],
        activation_bytes_peak=record.activation_bytes_peak,
        weight_versions_peak=record.weight_versions_peak,
        origin=record.origin,
        host=record.host,
        losses=losses,
        num_slots=num_slots,
    )


def pack_stamps(
    events: Sequence[Stamp],
    waits: Sequence[Stamp],
    *,
    activation_bytes_peak: int,
    weight_versions_peak: int,
    origin: float,
    host: int,
    losses: Tensor,
    num_slots: int,
    event_table: np.ndarray | None = None,
) -> Tensor:
    """`pack` from the executor's stamps, without building an `Event` or `Wait` per action.

    `event_table`, where given, is `events` already as rows of `EVENT_FIELDS` numbers (the
    executor builds it with array operations: a Python loop over a step's events here cost
    30 µs warm and about 100 cold, on the last rank to finish, which every rank waits for)."""
    if len(events) > num_slots or len(waits) > num_slots:
        raise PipelineError(
            f"a step recorded {len(events)} events and {len(waits)} waits, more than the "
            f"{num_slots} slots its program has; this is a bug in pipefold, please report it"
        )
    # numpy converts a list of Python numbers ten times faster than `torch.tensor` does.
    row = np.zeros(_HEADER + 2 * _FIELDS * num_slots, dtype=np.float64)
    row[:_HEADER] = (len(events), len(waits), activation_bytes_peak, weight_versions_peak, origin, host)
    code = _OP_CODE
    stamped: tuple[tuple[int, Sequence[Stamp]], ...] = (
        (_HEADER, events), (_HEADER + _FIELDS * num_slots, waits)
    )
    if event_table is not None:
        if event_table.shape != (len(events), _FIELDS):
            raise PipelineError(
                f"the event table has shape {event_table.shape} for {len(events)} events; "
                "this is a bug in pipefold, please report it"
            )
        row[_HEADER : _HEADER + event_table.size] = event_table.reshape(-1)
        stamped = stamped[1:]
    for at, items in stamped:
        values: list[float] = []
        for action, start, end in items:
            values += (code[action.op], action.stage, action.microbatch, start, end)
        row[at : at + len(values)] = values
    return torch.cat([torch.from_numpy(row).to(losses.device), losses.to(torch.float64).reshape(-1)])


def losses_of(rows: Sequence[Tensor], num_slots: int, num_microbatches: int) -> Tensor:
    """The per-micro-batch losses, summed over the ranks' rows."""
    loss_start = _HEADER + 2 * _FIELDS * num_slots
    return torch.stack([row[loss_start : loss_start + num_microbatches] for row in rows]).sum(dim=0)


def unpack(rows: Sequence[Tensor], num_slots: int) -> list[RankRecord]:
    """Every rank's record (index = pipeline rank)."""
    records = []
    loss_start = _HEADER + 2 * _FIELDS * num_slots
    for rank, row in enumerate(rows):
        values = row[:loss_start].cpu().tolist()
        num_events, num_waits = int(values[0]), int(values[1])
        events_at = _HEADER
        waits_at = _HEADER + _FIELDS * num_slots
        events = tuple(
            Event(rank, action, start, end)
            for action, start, end in _actions(values, events_at, num_events)
        )
        waits = tuple(
            Wait(rank, action, start, end)
            for action, start, end in _actions(values, waits_at, num_waits)
        )
        records.append(
            RankRecord(
                events=events,
                waits=waits,
                activation_bytes_peak=int(values[2]),
                weight_versions_peak=int(values[3]),
                origin=values[4],
                host=int(values[5]),
            )
        )
    return records


def _actions(values: list[float], start: int, count: int) -> list[tuple[Action, float, float]]:
    found = []
    for index in range(count):
        op, stage, microbatch, begin, end = values[start + _FIELDS * index : start + _FIELDS * (index + 1)]
        found.append((Action(_OPS[int(op)], int(stage), int(microbatch)), begin, end))
    return found


class GatheredStep:
    """One step's measurements, decoded into a `Timeline` on the first `timeline()` call."""

    def __init__(self, decode: Callable[[], Timeline]) -> None:
        self._decode = decode
        self._decoded: Timeline | None = None

    def timeline(self) -> Timeline:
        if self._decoded is None:
            self._decoded = self._decode()
        return self._decoded
