"""`Placement`: the names of the stage layouts a schedule can be searched or probed for.

    >>> from pipefold.schedule import layout_of, placement_of
    >>> placement_of("v", num_ranks=2, num_virtual=2)
    (0, 1, 1, 0)
    >>> layout_of((0, 1, 1, 0), num_ranks=2, num_virtual=2)
    'v'

The tuples themselves come from `contiguous_placement`, `looped_placement` and
`v_placement` in `pipefold.schedule.ir`; this module maps between them and their names.
"""

from __future__ import annotations

from typing import Literal

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import contiguous_placement, looped_placement, v_placement

__all__ = ["PLACEMENTS", "Placement", "layout_of", "placement_of"]

Placement = Literal["contiguous", "v", "looped"]
"""Stage layout by name: one stage per rank, zig-zag (as ZB-V), or round robin."""

PLACEMENTS: tuple[Placement, ...] = ("contiguous", "v", "looped")


def layout_of(placement: tuple[int, ...], num_ranks: int, num_virtual: int) -> Placement | None:
    """The name of a stage placement ("contiguous", "looped", "v"), or None for a placement
    without one (the schedule search does not search it)."""
    if num_virtual == 1:
        return "contiguous" if tuple(placement) == contiguous_placement(num_ranks) else None
    if tuple(placement) == v_placement(num_ranks, num_virtual):
        return "v"
    if tuple(placement) == looped_placement(num_ranks, num_virtual):
        return "looped"
    return None


def placement_of(placement: str, num_ranks: int, num_virtual: int) -> tuple[int, ...]:
    """The stage placement a layout name stands for; ScheduleError for an unknown name or a
    contiguous layout with several stages per rank."""
    if placement not in PLACEMENTS:
        raise ScheduleError(f"placement={placement!r}; use one of {', '.join(map(repr, PLACEMENTS))}")
    if placement == "contiguous":
        if num_virtual != 1:
            raise ScheduleError(
                f"placement='contiguous' holds one stage per rank; got num_virtual={num_virtual}. "
                "Use placement='looped' or 'v' for several stages per rank"
            )
        return contiguous_placement(num_ranks)
    if placement == "looped":
        return looped_placement(num_ranks, num_virtual)
    return v_placement(num_ranks, num_virtual)
