"""Placement names: `placement_of` and `layout_of` invert each other; the schedule IR stands alone."""

import subprocess
import sys

import pytest

from pipefold.errors import ScheduleError
from pipefold.schedule import (
    PLACEMENTS,
    contiguous_placement,
    layout_of,
    looped_placement,
    placement_of,
    v_placement,
)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_placement_names_round_trip(num_ranks):
    assert placement_of("contiguous", num_ranks, 1) == contiguous_placement(num_ranks)
    assert layout_of(contiguous_placement(num_ranks), num_ranks, 1) == "contiguous"
    for num_virtual in (2, 3):
        assert placement_of("looped", num_ranks, num_virtual) == looped_placement(num_ranks, num_virtual)
        assert placement_of("v", num_ranks, num_virtual) == v_placement(num_ranks, num_virtual)
        for name in ("looped", "v"):
            placement = placement_of(name, num_ranks, num_virtual)
            # With one rank, looped and V place the same; layout_of names it V first.
            assert layout_of(placement, num_ranks, num_virtual) in ({name, "v"} if num_ranks == 1 else {name})


def test_layout_of_unnamed_placement():
    assert layout_of((1, 0), 2, 1) is None
    assert layout_of((0, 0, 1, 1), 2, 2) is None


def test_placement_of_refuses_with_the_fix():
    with pytest.raises(ScheduleError, match="use one of 'contiguous', 'v', 'looped'"):
        placement_of("diagonal", 2, 1)
    with pytest.raises(ScheduleError, match="Use placement='looped' or 'v'"):
        placement_of("contiguous", 2, 2)
    assert PLACEMENTS == ("contiguous", "v", "looped")


def test_schedule_imports_neither_simulator_nor_planner():
    code = (
        "import sys, pipefold.schedule\n"
        "print(sorted(m for m in ('torch', 'pipefold.simulate', 'pipefold.plan') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
