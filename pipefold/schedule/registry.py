"""Name -> schedule family. `build("1f1b", num_ranks=4, num_microbatches=8)`.

Each family module under `families/` defines one `Family` and registers it; the
registry checks the parameters, calls the pure generator and validates the
result, so every schedule handed out has passed `validate`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Schedule

__all__ = ["Family", "register", "build", "names", "family"]

Generator = Callable[[int, int, int], Schedule]
"""(num_ranks, num_microbatches, num_virtual) -> Schedule. Pure; no I/O, no torch."""

Check = Callable[[int, int, int], None]
"""Raises ScheduleError naming the violated constraint and a legal alternative."""


@dataclass(frozen=True)
class Family:
    """A schedule family and what a user needs to know to pick it."""

    name: str
    generate: Generator
    check: Check
    summary: str
    """One line: what it is and where it comes from."""
    bubble: str
    """Bubble fraction with uniform costs, as a formula in p (ranks), m, v."""
    memory: str
    """Peak in-flight micro-batches (activations held) per rank, as a formula."""
    legal: str
    """The legal parameter range, in words."""
    default_virtual: int = 1
    """num_virtual used when the caller does not give one."""


_FAMILIES: dict[str, Family] = {}


def register(entry: Family) -> Family:
    if entry.name in _FAMILIES:
        raise ScheduleError(f"schedule family {entry.name!r} is registered twice")
    _FAMILIES[entry.name] = entry
    return entry


def _load() -> None:
    # Importing the package registers every family; deferred so ir/validate stay importable alone.
    import pipefold.schedule.families  # noqa: F401


def names() -> list[str]:
    """Registered family names, in the order the families were registered."""
    _load()
    return list(_FAMILIES)


def family(name: str) -> Family:
    _load()
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
    from pipefold.schedule.validate import validate

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
