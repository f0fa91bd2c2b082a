"""Robust summaries of repeated step times. No torch import."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Summary", "summarize"]


@dataclass(frozen=True)
class Summary:
    """Median and spread of a sample of step times (seconds)."""

    median: float
    q25: float
    q75: float
    minimum: float
    maximum: float
    count: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.1 = the middle half spans 10%)."""
        return (self.q75 - self.q25) / self.median if self.median > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("cannot summarize an empty sample")
    ordered = sorted(samples)
    if len(ordered) == 1:
        q25 = q75 = ordered[0]
    else:
        q25, _, q75 = statistics.quantiles(ordered, n=4, method="inclusive")
    return Summary(
        median=statistics.median(ordered),
        q25=q25,
        q75=q75,
        minimum=ordered[0],
        maximum=ordered[-1],
        count=len(ordered),
    )
