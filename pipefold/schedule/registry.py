"""Name -> schedule family. `build("1f1b", num_ranks=4, num_microbatches=8)`.

Each family module under `families/` defines one `Family` (`families.FAMILIES` lists them,
simplest first); the registry checks the parameters, calls the pure generator and
validates the result, so every schedule handed out has passed `validate`.
"""

from __future__ import annotations

from pipefold.errors import ScheduleError
from pipefold.schedule.families import FAMILIES
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Schedule
from pipefold.schedule.validate import validate

__all__ = ["register", "build", "names", "family"]

_FAMILIES: dict[str, Family] = {}


def register(entry: Family) -> Family:
    """Add a family under its name (the built-in ones are registered on import)."""
    if entry.name in _FAMILIES:
        raise ScheduleError(f"schedule family {entry.name!r} is registered twice")
    _FAMILIES[entry.name] = entry
    return entry


for _entry in FAMILIES:
    register(_entry)


def names() -> list[str]:
    """Registered family names, in the order the families were registered."""
    return list(_FAMILIES)


def family(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ScheduleError(
            f"unknown schedule {name!r}; known schedules: {', '.join(_FAMILIES)}"
        ) from None


def build(
    name: str, *, num_ranks: int, num_microbatches: int, num_virtual: int | None = None
) -> Schedule:
    """Generate and validate the schedule `name` for these parameters."""
    entry = family(name)
    virtual = entry.default_virtual if num_virtual is None else num_virtual
    if num_ranks < 1:
        raise ScheduleError(f"num_ranks must be >= 1; got {num_ranks}")
    if num_microbatches < 1:
        raise ScheduleError(f"num_microbatches must be >= 1; got {num_microbatches}")
    if virtual < 1:
        raise ScheduleError(f"num_virtual must be >= 1; got {virtual}")
    entry.check(num_ranks, num_microbatches, virtual)
    schedule = entry.generate(num_ranks, num_microbatches, virtual)
    validate(schedule)
    return schedule
