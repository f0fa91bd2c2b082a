"""Full sharding's variants of one configuration (freed between micro-batches, gathers issued
early) bounded by its default variant, so the search simulates a variant only where it may win.

`GatherVariants` remembers each configuration's default record (not freed, no look-ahead); once
that one is simulated, `bound` gives a lower bound on any sibling's step and `dominated` says
when a look-ahead has nothing left to hide. Used by `pipefold.plan.search`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from pipefold.plan.degree import Degree
from pipefold.plan.ranking import bucket_floor
from pipefold.plan.record import Record
from pipefold.plan.result import Candidate
from pipefold.plan.space import Config
from pipefold.simulate import CostModel

__all__ = ["GatherVariants", "price_exposures"]


class GatherVariants:
    """Each full-sharding configuration's default variant, by (degree, configuration)."""

    def __init__(self) -> None:
        self._defaults: dict[tuple[Degree, Config], Record] = {}

    def add(self, record: Record) -> None:
        """Remember `record` where it is a full-sharding configuration's default variant."""
        config = record.config
        if config.shard == "full" and not config.free_between and not config.gather_lookahead:
            self._defaults[(record.degree, config)] = record

    def bound(self, record: Record, recompute: tuple[int, ...], model: Callable[[], CostModel]) -> float:
        """A lower bound on a free / look-ahead variant's step from its configuration's default
        variant, once simulated: that step less the time its gathers left exposed (the same
        schedule with instant gathers), which a look-ahead at best hides and freeing between
        micro-batches only adds to, less every sharding action's overhead (a variant may move them
        where the rank waits anyway). 0 where not known; `model` gives the variant's cost model."""
        config = record.config
        if config.shard != "full" or (not config.free_between and not config.gather_lookahead):
            return 0.0
        default = self._defaults.get((record.degree, replace(config, free_between=False, gather_lookahead=0)))
        if default is None or recompute not in default.tried or default.bounds != record.bounds:
            return 0.0
        found = default.tried[recompute]
        costs = model()
        exposed = found.gather_exposed_s or 0.0  # (priced: the search prices every default variant)
        return found.step_time - exposed - 3 * costs.num_stages * costs.action_overhead

    def dominated(self, record: Record, recompute: tuple[int, ...], bound: float) -> bool:
        """Whether a look-ahead without freeing cannot rank ahead of its configuration's default
        variant: its bound is in the default's time bucket (nothing left to hide) and it holds at
        least as much (each stage gathered once, earlier)."""
        config = record.config
        if config.shard != "full" or config.free_between or not config.gather_lookahead:
            return False
        default = self._defaults.get((record.degree, replace(config, gather_lookahead=0)))
        if default is None or recompute not in default.tried:
            return False
        return bound >= bucket_floor(default.tried[recompute].step_time)


def price_exposures(
    records: list[Record], wanted: list[Candidate],
    evaluate: Callable[[Record, tuple[int, ...], bool], Candidate],
) -> dict[int, Candidate]:
    """The `wanted` candidates whose gathers' exposed time is unpriced, evaluated again with it
    (`evaluate(record, recompute, price_exposure)`; the records keep these): {id(unpriced): priced}."""
    index = {id(c): (record, recompute) for record in records for recompute, c in record.tried.items()}
    priced: dict[int, Candidate] = {}
    for candidate in wanted:
        known = candidate.gather_exposed_s is not None or id(candidate) in priced
        if known or id(candidate) not in index:
            continue
        record, recompute = index[id(candidate)]
        found = record.tried[recompute] = evaluate(record, recompute, True)
        priced[id(candidate)] = found
    return priced
