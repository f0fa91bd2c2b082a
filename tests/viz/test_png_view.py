"""PNG views: a readable PNG is written atomically, alone or predicted-above-measured."""

from dataclasses import replace

from pipefold.schedule import build
from pipefold.simulate import CostModel, simulate
from pipefold.viz import save_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    # IHDR: width and height are the first two big-endian words after the chunk header.
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_is_written_and_leaves_no_temporary_file(tmp_path):
    timeline = simulate(build("zb-h1", num_ranks=3, num_microbatches=4), CostModel.uniform(3))
    path = save_png(timeline, tmp_path / "charts" / "zb.png")
    assert path == tmp_path / "charts" / "zb.png"
    assert path.stat().st_size > 1000
    png_size(path)
    assert [p.name for p in path.parent.iterdir()] == ["zb.png"]


def test_compare_draws_a_taller_figure_with_both_panels(tmp_path):
    predicted = simulate(build("1f1b", num_ranks=4, num_microbatches=8), CostModel.uniform(4))
    measured = replace(predicted, source="measured")
    alone = png_size(save_png(measured, tmp_path / "alone.png"))
    both = png_size(save_png(measured, tmp_path / "both.png", compare=predicted))
    assert both[0] == alone[0]
    assert both[1] > alone[1]


def test_png_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "chart.png"
    path.write_bytes(b"old")
    timeline = simulate(build("gpipe", num_ranks=2, num_microbatches=2), CostModel.uniform(2))
    save_png(timeline, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
