"""ASCII views: golden charts for tiny cases, widths, colours, the order grid."""

import pytest

from pipefold.errors import ConfigError
from pipefold.schedule import Action, build
from pipefold.simulate import CostModel, simulate
from pipefold.timeline import Event, Timeline
from pipefold.viz import COLORS, render_ascii, render_order
from pipefold.viz.colors import ansi

GPIPE_2X2 = """\
rank 0 FF...BBBB
rank 1 .FFBBBB..

F forward  B backward  . idle
gpipe (simulated): makespan 9 s, bubble 33.3%, one column = 1 s"""

ZB_H1_3X4 = """\
rank 0 FFF..IWFIWIWIW
rank 1 .FF.IFIWFIWIWW
rank 2 ..FIFIFIWFIWWW

F forward  I input grad  W weight grad  . idle
zb-h1 (simulated): makespan 14 s, bubble 14.3%, one column = 1 s"""


def test_gpipe_golden():
    timeline = simulate(build("gpipe", num_ranks=2, num_microbatches=2), CostModel.uniform(2))
    assert render_ascii(timeline) == GPIPE_2X2


def test_zb_h1_golden():
    timeline = simulate(build("zb-h1", num_ranks=3, num_microbatches=4), CostModel.uniform(3))
    assert render_ascii(timeline) == ZB_H1_3X4


def test_explicit_width_scales_the_time_axis():
    timeline = simulate(build("gpipe", num_ranks=2, num_microbatches=2), CostModel.uniform(2))
    chart = render_ascii(timeline, width=18, show_legend=False)
    assert chart == (
        "rank 0 FFFF......BBBBBBBB\n"
        "rank 1 ..FFFFBBBBBBBB...."
    )


def test_bad_width_is_refused():
    timeline = simulate(build("gpipe", num_ranks=2, num_microbatches=2), CostModel.uniform(2))
    with pytest.raises(ConfigError, match="width = 0"):
        render_ascii(timeline, width=0)


def test_step_and_uneven_durations_use_the_shortest_action_as_one_column():
    events = (
        (Event(0, Action.parse("F0.0"), 0.0, 0.5), Event(0, Action.parse("STEP0.0"), 1.0, 1.5)),
    )
    chart = render_ascii(Timeline(num_ranks=1, events=events), show_legend=False)
    assert chart == "rank 0 F.S"


def test_colour_uses_the_shared_palette():
    timeline = simulate(build("gpipe", num_ranks=2, num_microbatches=2), CostModel.uniform(2))
    chart = render_ascii(timeline, color=True)
    assert ansi(COLORS[Action.parse("F0.0").op], "F") in chart
    assert "\x1b[" not in render_ascii(timeline)


def test_order_grid_lists_actions_as_they_ran():
    timeline = simulate(build("gpipe", num_ranks=2, num_microbatches=2), CostModel.uniform(2))
    assert render_order(timeline) == (
        "       0    1    2    3\n"
        "rank 0 F0.0 F0.1 B0.0 B0.1\n"
        "rank 1 F1.0 F1.1 B1.0 B1.1"
    )


def test_wide_timelines_are_capped():
    timeline = simulate(
        build("interleaved-1f1b", num_ranks=8, num_microbatches=32, num_virtual=4),
        CostModel.uniform(32, f=0.25, i=0.25, w=0.25),
    )
    rows = render_ascii(timeline, show_legend=False).splitlines()
    assert len(rows) == 8
    assert all(len(row) == len("rank 0 ") + 160 for row in rows)


def test_empty_timeline_renders_idle_rows():
    timeline = Timeline(num_ranks=2, events=((), ()))
    assert render_ascii(timeline, show_legend=False) == "rank 0 \nrank 1 "


def test_odd_steps_are_lower_case():
    schedule = build("gpipe", num_ranks=2, num_microbatches=1)
    timeline = simulate(schedule, CostModel.uniform(2), num_steps=3, sync=True)
    assert render_ascii(timeline).splitlines()[:2] == [
        "rank 0 F...BBf...bbF...BB",
        "rank 1 .FBB...fbb...FBB..",
    ]
    assert "3 steps; odd steps in lower case" in render_ascii(timeline)
    assert ansi(COLORS[Action.parse("F0.0").op], "f") in render_ascii(timeline, color=True)
