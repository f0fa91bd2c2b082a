"""PNG views: a readable PNG, alone or predicted-above-measured."""

from dataclasses import replace

from pipefold.schedule import build
from pipefold.simulate import CostModel, simulate
from pipefold.viz import render_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data):
    assert data[:8] == PNG_SIGNATURE
    # IHDR: width and height are the first two big-endian words after the chunk header.
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_is_a_png():
    timeline = simulate(build("zb-h1", num_ranks=3, num_microbatches=4), CostModel.uniform(3))
    data = render_png(timeline)
    assert len(data) > 1000
    png_size(data)


def test_compare_draws_a_taller_figure_with_both_panels():
    predicted = simulate(build("1f1b", num_ranks=4, num_microbatches=8), CostModel.uniform(4))
    measured = replace(predicted, source="measured")
    alone = png_size(render_png(measured))
    both = png_size(render_png(measured, compare=predicted))
    assert both[0] == alone[0]
    assert both[1] > alone[1]
