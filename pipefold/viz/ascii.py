"""Terminal views of a `Timeline`: a time chart and a compact action-order grid.

`render_ascii` draws one row per rank, time running right, one character per time
slot: the op letter of the action running at the middle of the slot, '.' when idle.
With uniform costs and the default width one slot is the shortest action, so GPipe
with p=2, m=2 and B = 2 F reads::

    rank 0 FF...BBBB
    rank 1 .FFBBBB..
"""

from __future__ import annotations

import bisect
import math

from pipefold.errors import ConfigError
from pipefold.schedule.ir import Op, format_grid
from pipefold.timeline import Event, Timeline
from pipefold.viz.colors import COLORS, IDLE_COLOR, IDLE_LETTER, LETTERS, NAMES, ansi

__all__ = ["render_ascii", "render_order", "legend"]

_MAX_AUTO_WIDTH = 160
"""Widest chart the automatic slot size may produce; most terminals are narrower than 200."""

_OP_OF_LETTER = {letter: op for op, letter in LETTERS.items()}


def legend(ops: set[Op] | None = None, *, color: bool = False) -> str:
    """One line naming each letter (only `ops` when given), idle last."""
    parts = []
    for op, letter in LETTERS.items():
        if ops is None or op in ops:
            shown = ansi(COLORS[op], letter) if color else letter
            parts.append(f"{shown} {NAMES[op]}")
    idle = ansi(IDLE_COLOR, IDLE_LETTER) if color else IDLE_LETTER
    parts.append(f"{idle} idle")
    return "  ".join(parts)


def _slot_seconds(timeline: Timeline, width: int | None) -> float:
    makespan = timeline.makespan
    if makespan <= 0:
        return 0.0
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"width = {width!r}; give a number of characters >= 1")
        return makespan / width
    shortest = min((e.duration for row in timeline.events for e in row if e.duration > 0), default=makespan)
    # Round to 9 digits so that float noise (1/3 + 1/3 + ...) does not add a column.
    if math.ceil(round(makespan / shortest, 9)) > _MAX_AUTO_WIDTH:
        return makespan / _MAX_AUTO_WIDTH
    return shortest


def _row_chars(row: tuple[Event, ...], origin: float, slot: float, num_slots: int) -> list[str]:
    starts = [event.start for event in row]
    chars = []
    for index in range(num_slots):
        middle = origin + (index + 0.5) * slot
        position = bisect.bisect_right(starts, middle) - 1
        if position >= 0 and row[position].start <= middle < row[position].end:
            event = row[position]
            letter = LETTERS[event.action.op]
            # Odd steps in lower case, so back-to-back steps stay apart without a barrier.
            chars.append(letter.lower() if event.step % 2 else letter)
        else:
            chars.append(IDLE_LETTER)
    return chars


def render_ascii(
    timeline: Timeline, width: int | None = None, *, color: bool = False, show_legend: bool = True
) -> str:
    """A chart per rank, one character per time slot (see the module docstring).

    `width` is the number of slots; by default one slot is the shortest action (at
    most 160 slots). Actions of odd steps use lower-case letters. `color=True` adds
    ANSI colours from the shared palette.
    """
    slot = _slot_seconds(timeline, width)
    makespan = timeline.makespan
    if makespan <= 0 or slot <= 0:
        num_slots = 0
    else:
        num_slots = width if width is not None else math.ceil(round(makespan / slot, 9))
    label_width = len(f"rank {timeline.num_ranks - 1}")
    lines = []
    for rank, row in enumerate(timeline.events):
        chars = _row_chars(row, timeline.start, slot, num_slots)
        if color:
            chars = [ansi(_color_of(char), char) for char in chars]
        lines.append(f"{f'rank {rank}':<{label_width}} {''.join(chars)}")
    if show_legend:
        ops = {event.action.op for row in timeline.events for event in row}
        lines.append("")
        lines.append(legend(ops, color=color))
        if timeline.num_steps > 1:
            lines.append(f"{timeline.num_steps} steps; odd steps in lower case")
        lines.append(
            f"{timeline.schedule_name or 'timeline'} ({timeline.source}): makespan {makespan:.6g} s, "
            f"bubble {timeline.bubble_fraction:.1%}, one column = {slot:.3g} s"
        )
    return "\n".join(lines)


def _color_of(char: str) -> str:
    return IDLE_COLOR if char == IDLE_LETTER else COLORS[_OP_OF_LETTER[char.upper()]]


def render_order(timeline: Timeline) -> str:
    """The actions each rank ran, in order, as an aligned grid (no time scale)."""
    return format_grid(tuple(tuple(event.action for event in row) for row in timeline.events))
