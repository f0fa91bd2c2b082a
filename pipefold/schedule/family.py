"""`Family`: one schedule family, its pure generator and what a user needs to know to pick it.

Each module under `families/` defines one as `FAMILY`; `families.FAMILIES` lists them and
`pipefold.schedule.registry` looks them up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipefold.schedule.ir import Schedule

__all__ = ["Check", "Family", "Generator"]

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
