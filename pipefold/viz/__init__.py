"""Views of a `Timeline`: ASCII for the terminal, PNG for reports, Chrome trace JSON.

All three draw F, B, I, W, STEP and idle time with the one palette in `colors`.
matplotlib is imported only when a PNG is drawn.
"""

from pipefold.viz.ascii import legend, render_ascii, render_order
from pipefold.viz.colors import COLORS, IDLE_COLOR, IDLE_LETTER, LETTERS
from pipefold.viz.png import render_png
from pipefold.viz.trace import to_chrome_trace

__all__ = [
    "COLORS",
    "IDLE_COLOR",
    "IDLE_LETTER",
    "LETTERS",
    "legend",
    "render_ascii",
    "render_order",
    "render_png",
    "to_chrome_trace",
]
