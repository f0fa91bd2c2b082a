"""Schedules as data: the IR, the families, lowering and validation. No torch import.

    >>> from pipefold.schedule import build, lower, validate
    >>> schedule = build("1f1b", num_ranks=4, num_microbatches=8)
    >>> program = lower(schedule)   # with the SEND/RECV actions the runtime executes

Searching a schedule for measured costs is planning: `pipefold.plan.find_schedule`.
"""

from pipefold.errors import ScheduleError
from pipefold.schedule.family import Family
from pipefold.schedule.ir import (
    Action,
    Op,
    Schedule,
    WeightUpdate,
    contiguous_placement,
    format_grid,
    looped_placement,
    v_placement,
)
from pipefold.schedule.lower import Program, lower
from pipefold.schedule.placement import PLACEMENTS, Placement, layout_of, placement_of
from pipefold.schedule.registry import build, family, names
from pipefold.schedule.shard import (
    add_sharding,
    gathers_per_step,
    is_sharded,
    join_units,
    reductions_per_step,
    shard_units,
    strip_sharding,
    unit_costs,
)
from pipefold.schedule.stream import STREAMING_FAMILIES, Stream, stream
from pipefold.schedule.validate import validate

__all__ = [
    "Action",
    "Family",
    "Op",
    "PLACEMENTS",
    "Placement",
    "Program",
    "STREAMING_FAMILIES",
    "Schedule",
    "ScheduleError",
    "Stream",
    "WeightUpdate",
    "add_sharding",
    "build",
    "contiguous_placement",
    "family",
    "format_grid",
    "gathers_per_step",
    "is_sharded",
    "join_units",
    "layout_of",
    "looped_placement",
    "lower",
    "names",
    "placement_of",
    "reductions_per_step",
    "shard_units",
    "stream",
    "strip_sharding",
    "unit_costs",
    "v_placement",
    "validate",
]
