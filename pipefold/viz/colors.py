"""The one palette: every view draws F, B, I, W, STEP, full sharding's UNSHARD (U), REDUCE_GRAD
(R) and RESHARD (X), and idle time the same way.

Colours are Tableau 10 hues, distinguishable for common colour-blindness and in
grey-scale print; letters are the literature's op letters (S for STEP).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from pipefold.schedule.ir import Op

__all__ = ["COLORS", "IDLE_COLOR", "LETTERS", "IDLE_LETTER", "NAMES", "ansi", "text_color"]

COLORS: Mapping[Op, str] = MappingProxyType(
    {
        Op.F: "#4e79a7",  # blue
        Op.B: "#f28e2b",  # orange
        Op.I: "#e15759",  # red: the input-gradient half of B, on the critical path
        Op.W: "#59a14f",  # green: the deferrable half, what zero-bubble schedules move around
        Op.STEP: "#b07aa1",  # purple
        Op.UNSHARD: "#76b7b2",  # teal: a weight gather starts
        Op.REDUCE_GRAD: "#edc948",  # yellow: a gradient reduce-scatter
        Op.RESHARD: "#9c755f",  # brown: gathered weights freed
    }
)
IDLE_COLOR = "#e8e8e8"

LETTERS: Mapping[Op, str] = MappingProxyType(
    {
        Op.F: "F", Op.B: "B", Op.I: "I", Op.W: "W", Op.STEP: "S",
        Op.UNSHARD: "U", Op.REDUCE_GRAD: "R", Op.RESHARD: "X",
    }
)
IDLE_LETTER = "."

NAMES: Mapping[Op, str] = MappingProxyType(
    {
        Op.F: "forward",
        Op.B: "backward",
        Op.I: "input grad",
        Op.W: "weight grad",
        Op.STEP: "optimizer step",
        Op.UNSHARD: "weight gather",
        Op.REDUCE_GRAD: "gradient reduce-scatter",
        Op.RESHARD: "weights freed",
    }
)


def _rgb(hex_color: str) -> tuple[int, int, int]:
    value = hex_color.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def ansi(hex_color: str, text: str) -> str:
    """`text` on a 24-bit ANSI background of `hex_color`, for terminals."""
    red, green, blue = _rgb(hex_color)
    fg_red, fg_green, fg_blue = _rgb(text_color(hex_color))
    return f"\x1b[48;2;{red};{green};{blue}m\x1b[38;2;{fg_red};{fg_green};{fg_blue}m{text}\x1b[0m"


def text_color(hex_color: str) -> str:
    """Black or white, whichever reads better on `hex_color` (WCAG relative luminance)."""
    red, green, blue = (channel / 255 for channel in _rgb(hex_color))
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "#000000" if luminance > 0.5 else "#ffffff"
