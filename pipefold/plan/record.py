"""`Record`: what the planner's search learned about one configuration.

The search (search.py) fills one per configuration: its bounds, the candidates simulated
per recompute choice, and why the rest were skipped; the explanations (explain.py) read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipefold.plan.degree import Degree
from pipefold.plan.ranking import rank_key
from pipefold.plan.result import Candidate
from pipefold.plan.space import Config

__all__ = ["Record"]


@dataclass
class Record:
    """What the search learned about one configuration."""

    degree: Degree
    config: Config
    bounds: tuple[int, ...]
    placement: tuple[int, ...]
    allreduce_s: float
    """The gradient all-reduce after the schedule: fixed by the partition, whatever is recomputed."""
    lower_bound: float
    """Lower bound on its step time without recompute."""
    tried: dict[tuple[int, ...], Candidate] = field(default_factory=dict)
    """Simulated candidates by recomputed stages."""
    pruned_bound: float | None = None
    """The least step-time bound among the choices the bound skipped (all of them, when nothing was
    simulated; the remaining recompute choices otherwise); None when none was skipped."""
    static_over: tuple[int, int] | None = None
    """(rank, bytes) when weights, gradients and optimizer state alone exceed the limit there."""

    def prune(self, bound: float) -> None:
        self.pruned_bound = bound if self.pruned_bound is None else min(self.pruned_bound, bound)

    def best(self, limit: float) -> Candidate | None:
        fits = [c for c in self.tried.values() if c.over_limit(limit) <= 0]
        return min(fits, key=rank_key) if fits else None

    def leanest(self) -> Candidate | None:
        return min(self.tried.values(), key=lambda c: (c.peak_memory, c.step_time), default=None)
