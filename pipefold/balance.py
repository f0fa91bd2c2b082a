"""Contiguous cuts of a weighted sequence: the `Partition` value and the exact `balance` solver.

Plain Python and numpy, no torch, so the planner (`pipefold.plan`) balances stages
without loading a model; `pipefold.model.partition` re-exports both for model users.

Among cuts with the same slowest stage it takes the most even, earlier stages larger
(docs/decisions.md, "Balance tie-break").
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipefold.errors import PartitionError

__all__ = ["Partition", "balance", "stage_times", "check_weights"]


@dataclass(frozen=True)
class Partition:
    """Contiguous stages: stage s owns layers `range(bounds[s], bounds[s + 1])`, each at least one."""

    bounds: tuple[int, ...]
    """num_stages + 1 cut points, from 0 to num_layers, strictly increasing."""

    def __post_init__(self) -> None:
        try:
            # operator.index admits numpy integers and refuses floats; a tuple keeps the value hashable.
            bounds = tuple(operator.index(b) for b in self.bounds if not isinstance(b, bool))
            complete = len(bounds) == len(self.bounds)
        except TypeError:
            bounds, complete = (), False
        if len(bounds) < 2 or not complete:
            raise PartitionError(
                f"Partition bounds must be at least 2 integers (0, ..., num_layers), got {self.bounds!r}"
            )
        object.__setattr__(self, "bounds", bounds)
        if bounds[0] != 0:
            raise PartitionError(f"Partition bounds must start at 0, got {bounds!r}")
        for stage in range(len(bounds) - 1):
            if bounds[stage + 1] <= bounds[stage]:
                raise PartitionError(
                    f"Partition bounds {bounds!r} give stage {stage} no layers "
                    f"({bounds[stage]}:{bounds[stage + 1]}); every stage needs at least one layer"
                )

    @classmethod
    def from_counts(cls, counts: Sequence[int]) -> Partition:
        """`Partition.from_counts([3, 3, 2])` is `[0:3 | 3:6 | 6:8]`."""
        if not counts or not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise PartitionError(
                f"per-stage layer counts must be a non-empty list of integers, got {counts!r}"
            )
        for stage, count in enumerate(counts):
            if count < 1:
                raise PartitionError(
                    f"per-stage layer counts {list(counts)} give stage {stage} {count} layers; "
                    f"every stage needs at least one layer"
                )
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count)
        return cls(tuple(bounds))

    @classmethod
    def parse(cls, text: str) -> Partition:
        """Inverse of `str`: `Partition.parse("[0:3 | 3:6 | 6:8]")`."""
        body = text.strip().removeprefix("[").removesuffix("]")
        bounds: list[int] = []
        for part in body.split("|"):
            match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
            if match is None or (bounds and int(match.group(1)) != bounds[-1]):
                raise PartitionError(
                    f"cannot read partition {text!r}; write contiguous ranges like '[0:3 | 3:6 | 6:8]'"
                )
            if not bounds:
                bounds.append(int(match.group(1)))
            bounds.append(int(match.group(2)))
        return cls(tuple(bounds))

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return self.bounds[-1]

    @property
    def counts(self) -> tuple[int, ...]:
        """Layers per stage."""
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:], strict=False))

    def layers_of(self, stage: int) -> range:
        if not 0 <= stage < self.num_stages:
            raise PartitionError(
                f"stage {stage} does not exist; this partition has stages 0..{self.num_stages - 1}"
            )
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_of(self, layer: int) -> int:
        """The stage that owns layer index `layer`."""
        if not 0 <= layer < self.num_layers:
            raise PartitionError(
                f"layer {layer} does not exist; this partition has layers 0..{self.num_layers - 1}"
            )
        return next(s for s in range(self.num_stages) if layer < self.bounds[s + 1])

    def __str__(self) -> str:
        return "[" + " | ".join(f"{a}:{b}" for a, b in zip(self.bounds, self.bounds[1:], strict=False)) + "]"


def check_weights(values: Sequence[float], name: str, num_layers: int) -> list[float]:
    if len(values) != num_layers:
        raise PartitionError(
            f"{name} has {len(values)} entries but the model has {num_layers} layers; give one per layer"
        )
    result = [float(v) for v in values]
    for index, value in enumerate(result):
        if not math.isfinite(value) or value < 0:
            raise PartitionError(f"{name}[{index}] = {values[index]!r}; every entry must be finite and >= 0")
    return result


def balance(
    weights: Sequence[float],
    num_stages: int,
    stage_speeds: Sequence[float] | None = None,
) -> Partition:
    """The exact min-max contiguous cut of `weights` into `num_stages` stages.

    Stage s takes `sum(weights of its layers) / stage_speeds[s]`. Dynamic programming
    over (stage, cut point), vectorised per stage over the cut points a stage can take:
    O(num_stages * (num_layers - num_stages + 1)**2) time, O(num_layers**2) memory; ties broken
    as in docs/decisions.md, "Balance tie-break".
    """
    num_layers = len(weights)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise PartitionError(f"num_stages = {num_stages!r}; it must be an integer >= 1")
    if num_stages > num_layers:
        raise PartitionError(
            f"cannot cut {num_layers} layers into {num_stages} stages: every stage needs at least one layer; "
            f"use at most {num_layers} stages, or describe the model with more, smaller layers"
        )
    values = check_weights(weights, "weights", num_layers)
    speeds = [1.0] * num_stages if stage_speeds is None else list(stage_speeds)
    if len(speeds) != num_stages:
        raise PartitionError(f"stage_speeds has {len(speeds)} entries but there are {num_stages} stages")

    cumulative, by_speed = _tables(tuple(values), frozenset(speeds))
    costs = [by_speed[speed] for speed in speeds]

    # Stage j (from 0) can only start at a in [j, L - S + j] and end at b in [j + 1, L - S + j + 1]
    # (every stage takes a layer). Each pass works on the part of that band a cut with no stage
    # over a limit can reach (`_feasible_ends`): it holds every cut the pass could follow, so
    # the values and tie-breaks there are those of the whole table.

    # Most blocks of (start, end) a stage can take are a cell or a few: those are computed in
    # Python (numpy's per-call cost dominates there), the larger ones with numpy. The same floats
    # either way: `(cumulative[b] - cumulative[a]) / speed` is the matrix's entry, `t * t` numpy's
    # `t**2`, and max, min and == are exact.
    inf = math.inf

    # Pass 1: the optimal slowest stage, no more than that of an even cut (`_even_cut_slowest`).
    # On equal speeds, where no cut has its slowest stage below the even cut's, that is the
    # optimum (often so: then pass 1 is skipped); else it is at most the next smaller stage time.
    limit = _even_cut_slowest(cumulative, speeds)
    if len(by_speed) == 1:
        ((speed, matrix),) = by_speed.items()
        below = matrix[matrix < limit]
        if below.size == 0 or not _fits(cumulative, speed, num_stages, float(below.max())):
            return _least_squares(cumulative, speeds, limit, by_speed)
        limit = float(below.max())
    # best[b] = slowest stage of the best cut of layers [0, b), for the ends a stage can have.
    ends = _feasible_ends(cumulative, speeds, limit)
    best = [0.0]
    first, last = 0, 0
    for stage, cost in enumerate(costs):
        low, high = ends[stage]
        if first == last and low == high:  # one cell (most of them): the comprehension below, unrolled
            best = [max(best[0],
                        (cumulative[low] - cumulative[first]) / speeds[stage] if first < low else inf)]
        elif (last - first + 1) * (high - low + 1) <= _SMALL_BLOCK:
            speed = speeds[stage]
            best = [min(max(slowest, (cumulative[end] - cumulative[start]) / speed if start < end else inf)
                        for start, slowest in zip(range(first, last + 1), best, strict=True))
                    for end in range(low, high + 1)]
        else:
            best = np.maximum(
                np.asarray(best)[:, None], cost[first:last + 1, low:high + 1]
            ).min(axis=0).tolist()
        first, last = low, high
    (bottleneck,) = best

    return _least_squares(cumulative, speeds, bottleneck, by_speed)


@functools.lru_cache(maxsize=256)
def _tables(
    values: tuple[float, ...], speeds: frozenset[float]
) -> tuple[list[float], dict[float, np.ndarray]]:
    """The weights' prefix sums, and per distinct speed the (start, end) matrix of stage times
    (infinite where the stage would be empty): the same for every stage count, so the planner's
    many counts of one model's weights build them once."""
    num_layers = len(values)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
    segment = prefix[None, :] - prefix[:, None]  # segment[a, b] = sum of weights[a:b]
    forward = np.triu(np.ones((num_layers + 1, num_layers + 1), dtype=bool), k=1)  # a < b: non-empty stage
    # One array per distinct speed (one in all on equal devices), shared by the stages of that speed.
    by_speed = {speed: np.where(forward, segment / speed, np.inf) for speed in speeds}
    for matrix in by_speed.values():
        matrix.setflags(write=False)
    return prefix.tolist(), by_speed


def _least_squares(
    cumulative: list[float], speeds: Sequence[float], bottleneck: float, by_speed: dict[float, np.ndarray]
) -> Partition:
    """`balance`'s pass 2: of the cuts whose slowest stage is `bottleneck`, the least sum of squares."""
    num_layers, num_stages = len(cumulative) - 1, len(speeds)
    inf = math.inf
    # Among cuts reaching it, least sum of squares; on equal sums, the latest start.
    # Costs are recomputed from the same values, so `<= bottleneck` compares identical floats;
    # a block's squared costs, those over the bottleneck infinite, are computed for that block alone.
    # Only the cut points some cut with no stage over the bottleneck can take are visited
    # (`_feasible_ends`): usually a few per stage instead of the whole band.
    ends = _feasible_ends(cumulative, speeds, bottleneck)
    squares = [0.0]
    first, last = 0, 0
    starts: list[list[int]] = []
    """Per stage and end b in its interval, the latest start reaching the least sum."""
    for stage, speed in enumerate(speeds):
        low, high = ends[stage]
        # (An infinite total never equals a finite least one, and the infinite ones are never followed.)
        if first == last and low == high:  # one cell (most of them): the loop below, unrolled
            time = (cumulative[low] - cumulative[first]) / speed if first < low else inf
            squares = [squares[0] + (time * time if time <= bottleneck else inf)]
            starts.append([first])
        elif (last - first + 1) * (high - low + 1) <= _SMALL_BLOCK:
            least, latest = [], []
            for end in range(low, high + 1):
                totals = []
                for start, held in zip(range(first, last + 1), squares, strict=True):
                    time = (cumulative[end] - cumulative[start]) / speed if start < end else inf
                    totals.append(held + (time * time if time <= bottleneck else inf))
                smallest = min(totals)
                least.append(smallest)
                latest.append(last - totals[::-1].index(smallest))
            squares = least
            starts.append(latest)
        else:
            cost = by_speed[speed][first:last + 1, low:high + 1]
            total = np.asarray(squares)[:, None] + np.where(cost <= bottleneck, cost**2, np.inf)
            smallest_array = total.min(axis=0)
            squares = smallest_array.tolist()
            starts.append((last - np.argmax((total == smallest_array[None, :])[::-1], axis=0)).tolist())
        first, last = low, high
    bounds = [num_layers]
    for stage in range(num_stages - 1, -1, -1):
        bounds.append(starts[stage][bounds[-1] - ends[stage][0]])
    return Partition(tuple(reversed(bounds)))


_SMALL_BLOCK = 24
"""Blocks of (start, end) with at most this many cells are computed in Python, not numpy."""


def _fits(cumulative: list[float], speed: float, num_stages: int, limit: float) -> bool:
    """Whether `len(cumulative) - 1 >= num_stages` layers cut into `num_stages` stages of one speed,
    none over `limit`: each stage taking all it can, at most that many stages reach the end (more,
    smaller stages are as fast)."""
    num_layers = len(cumulative) - 1
    start = 0
    for _ in range(num_stages):
        end = start
        while end < num_layers and (cumulative[end + 1] - cumulative[start]) / speed <= limit:
            end += 1
        if end == start:
            return False
        if end == num_layers:
            return True
        start = end
    return False


def _even_cut_slowest(prefix: list[float], speeds: Sequence[float]) -> float:
    """The slowest stage of one valid cut: each stage ends nearest to its share of the total (in
    proportion to its speed), keeping a layer for each stage. An upper bound on the optimum."""
    num_layers, num_stages = len(prefix) - 1, len(speeds)
    total_speed = sum(speeds)
    share = 0.0
    start = 0
    slowest = 0.0
    for stage, speed in enumerate(speeds):
        share += speed
        end = num_layers
        if stage < num_stages - 1:
            target = prefix[-1] * share / total_speed
            end = bisect.bisect_left(prefix, target)
            if end > 0 and (end > num_layers or target - prefix[end - 1] <= prefix[end] - target):
                end -= 1
            end = max(start + 1, min(end, num_layers - num_stages + stage + 1))
        slowest = max(slowest, (prefix[end] - prefix[start]) / speed)
        start = end
    return slowest


def _feasible_ends(prefix: list[float], speeds: Sequence[float], limit: float) -> list[tuple[int, int]]:
    """Per stage, an interval holding every end that stage can have in a cut of `len(prefix) - 1`
    layers into `len(speeds)` non-empty stages none of which takes more than `limit`.

    A stage's time only grows as it takes more layers (weights are >= 0, and rounding keeps sums
    of such floats ordered), so no cut's stage s ends past where stages 0..s end when each takes
    all it can from the left (the latest end), nor before where stages s+1.. start when each takes
    all it can from the right; and every stage takes one layer at least. Pass 2 of `balance` visits
    only these ends: every cut it could follow lies inside, so the result is the band's."""
    num_layers, num_stages = len(prefix) - 1, len(speeds)
    latest = []
    start = end = 0
    for speed in speeds:
        while end < num_layers and (prefix[end + 1] - prefix[start]) / speed <= limit:
            end += 1
        latest.append(end)
        start = end
    earliest_start = [0] * num_stages
    start = end = num_layers
    for stage in range(num_stages - 1, -1, -1):
        while start > 0 and (prefix[end] - prefix[start - 1]) / speeds[stage] <= limit:
            start -= 1
        earliest_start[stage] = start
        end = start
    intervals = []
    for stage in range(num_stages):
        low = max(stage + 1, earliest_start[stage + 1] if stage + 1 < num_stages else num_layers)
        high = min(latest[stage], num_layers - num_stages + stage + 1)
        if stage == num_stages - 1:
            low = high = num_layers
        if low > high:
            # Not reachable when `limit` is the optimal slowest stage; the whole band then.
            low, high = stage + 1, num_layers - num_stages + stage + 1
        intervals.append((low, high))
    return intervals


def stage_times(
    result: Partition, costs: Sequence[float], stage_speeds: Sequence[float] | None = None
) -> tuple[float, ...]:
    """Per stage, `sum(costs of its layers) / stage_speeds[stage]`."""
    values = check_weights(costs, "costs", result.num_layers)
    speeds = [1.0] * result.num_stages if stage_speeds is None else stage_speeds
    return tuple(sum(values[i] for i in result.layers_of(s)) / speeds[s] for s in range(result.num_stages))
