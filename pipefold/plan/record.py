"""`Record`: what the planner's search learned about one configuration.

The search (search.py) fills one per configuration: its bounds, the candidates simulated
per recompute choice, and why the rest were skipped; the explanations (explain.py) read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipefold.plan.bounds import Backward
from pipefold.plan.degree import Degree
from pipefold.plan.memory import PeakMemory, RankMemory
from pipefold.plan.ranking import rank_key
from pipefold.plan.result import Candidate
from pipefold.plan.space import Config

__all__ = ["Record", "OverMemory"]


@dataclass(frozen=True)
class OverMemory(PeakMemory):
    """A recompute choice found over the memory limit before it was simulated: its memory per
    rank is known from the order alone (`pipefold.simulate.compiled`), its time is not."""

    recompute: tuple[int, ...]
    memory: tuple[RankMemory, ...]
    rank_limits: tuple[int, ...] = ()


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
    backward: Backward = "any"
    """How its schedule runs backwards, once generated ("any" before: the bound then holds for both)."""
    tried: dict[tuple[int, ...], Candidate] = field(default_factory=dict)
    """Simulated candidates by recomputed stages."""
    pruned_bound: float | None = None
    """The least step-time bound among the choices the bound skipped (all of them, when nothing was
    simulated; the remaining recompute choices otherwise); None when none was skipped."""
    static_over: tuple[int, int] | None = None
    """(rank, bytes) when weights, gradients and optimizer state alone exceed the limit there."""
    over: dict[tuple[int, ...], OverMemory] = field(default_factory=dict)
    """Recompute choices known over the limit without simulating them (by recomputed stages)."""

    def prune(self, bound: float) -> None:
        self.pruned_bound = bound if self.pruned_bound is None else min(self.pruned_bound, bound)

    def best(self, limit: float) -> Candidate | None:
        fits = [c for c in self.tried.values() if c.over_limit(limit) <= 0]
        return min(fits, key=rank_key) if fits else None

    def leanest(self) -> Candidate | None:
        return min(self.tried.values(), key=lambda c: (c.peak_memory, c.step_time), default=None)

    def leanest_unsimulated(self) -> OverMemory | None:
        """The leanest choice known over the limit without a simulation, where it is leaner than
        every simulated one."""
        found = min(self.over.values(), key=lambda o: o.peak_memory, default=None)
        simulated = self.leanest()
        if found is None or (simulated is not None and simulated.peak_memory <= found.peak_memory):
            return None
        return found
