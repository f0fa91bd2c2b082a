"""Schedules as data: the IR, the families, lowering and validation. No torch import.

    >>> from pipefold.schedule import build
    >>> schedule = build("1f1b", num_ranks=4, num_microbatches=8)
    >>> auto = find_schedule(costs, num_ranks=4, num_microbatches=8)   # searched for a CostModel
"""

from pipefold.errors import ScheduleError
from pipefold.schedule.auto import ScheduleSearch, find_schedule, search_schedule
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
from pipefold.schedule.probe import probe_schedule
from pipefold.schedule.registry import Family, build, family, names
from pipefold.schedule.validate import validate

__all__ = [
    "Action",
    "Family",
    "Op",
    "Program",
    "Schedule",
    "ScheduleError",
    "ScheduleSearch",
    "WeightUpdate",
    "build",
    "contiguous_placement",
    "family",
    "find_schedule",
    "format_grid",
    "looped_placement",
    "lower",
    "names",
    "probe_schedule",
    "search_schedule",
    "v_placement",
    "validate",
]
