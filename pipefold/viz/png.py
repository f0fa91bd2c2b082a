"""PNG Gantt charts of a `Timeline` for reports, optionally predicted above measured.

matplotlib is imported inside `render_png` only, and through its object API (`Figure`
with an Agg canvas) rather than pyplot, so drawing never switches the caller's
backend or touches global figure state.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any

from pipefold.schedule.ir import Op
from pipefold.timeline import Timeline
from pipefold.viz.colors import COLORS, IDLE_COLOR, NAMES, text_color

__all__ = ["render_png"]

_DPI = 120
_FIGURE_WIDTH = 12.0  # inches
_ROW_HEIGHT = 0.38  # inches per rank
_CHAR_PIXELS = 7.0  # width of one label character at the label font size


def _draw(axes: Any, timeline: Timeline, span: float, pixels_per_second: float) -> None:
    num_ranks = timeline.num_ranks
    origin = timeline.start  # each panel from its own start: measured clocks have any offset
    axes.set_xlim(0.0, span)
    axes.set_ylim(num_ranks - 0.5, -0.5)  # rank 0 on top
    axes.set_yticks(range(num_ranks))
    axes.set_yticklabels([f"rank {rank}" for rank in range(num_ranks)])
    axes.barh(range(num_ranks), span, left=0.0, height=0.8, color=IDLE_COLOR, linewidth=0)
    for rank, row in enumerate(timeline.events):
        # One broken_barh per op keeps thousands of actions to a handful of artists.
        # Odd steps are hatched so that back-to-back steps stay apart without a barrier.
        spans: dict[tuple[Op, bool], list[tuple[float, float]]] = defaultdict(list)
        for event in row:
            spans[(event.action.op, event.step % 2 == 1)].append((event.start - origin, event.duration))
        for (op, odd), bars in spans.items():
            axes.broken_barh(
                bars,
                (rank - 0.4, 0.8),
                facecolors=COLORS[op],
                edgecolors="white",
                linewidth=0.5,
                hatch="///" if odd else None,
            )
        for event in row:
            label = str(event.action.microbatch)
            if event.duration * pixels_per_second >= _CHAR_PIXELS * (len(label) + 1):
                axes.text(
                    (event.start + event.end) / 2 - origin,
                    rank,
                    label,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=text_color(COLORS[event.action.op]),
                )
    axes.set_title(
        f"{timeline.schedule_name or 'timeline'} ({timeline.source}): makespan {timeline.makespan:.4g} s, "
        f"bubble {timeline.bubble_fraction:.1%}",
        fontsize=9,
        loc="left",
    )


def render_png(timeline: Timeline, *, compare: Timeline | None = None) -> bytes:
    """Draw `timeline` as a Gantt chart (one row per rank); returns the PNG file's bytes (write
    them with `pipefold.files.write_atomic`).

    With `compare` (e.g. the simulator's prediction of a measured run) both are drawn
    on one time axis, `compare` above `timeline`, each from its own first action.
    Bars are labelled with their micro-batch where they are wide enough; odd steps
    are hatched.
    """
    # matplotlib: a heavy import that only this view needs; the other views load without it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    panels = [compare, timeline] if compare is not None else [timeline]
    span = max(panel.makespan for panel in panels) or 1.0
    heights = [max(panel.num_ranks, 1) * _ROW_HEIGHT + 0.6 for panel in panels]
    figure = Figure(figsize=(_FIGURE_WIDTH, sum(heights) + 0.8), dpi=_DPI)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(len(panels), 1, height_ratios=heights)
    # The axes span about 85 % of the figure width once rank labels take their share.
    pixels_per_second = _FIGURE_WIDTH * _DPI * 0.85 / span
    shared = None
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(grid[index, 0], sharex=shared)
        shared = shared or axes
        _draw(axes, panel, span, pixels_per_second)
    figure.axes[-1].set_xlabel("time since the first action (s)")

    ops = [op for op in COLORS if any(e.action.op is op for p in panels for row in p.events for e in row)]
    handles = [Patch(facecolor=COLORS[op], label=NAMES[op]) for op in ops]
    handles.append(Patch(facecolor=IDLE_COLOR, label="idle"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
