"""A lower bound on the step that knows the memory limit, for any order and any recomputed stages.

A rank's activations of micro-batch j at stage s are held at least from the end of its forward
to the start of its backward (B, or I where the backward is split), and that is at least the
round trip R_s through the later stages: their forwards, their backwards' input halves and the
sends both ways. Over a step of T seconds the rank holds m * sum_s A_s R_s byte-seconds, and
its activation peak is at least their average, so a rank that fits its headroom H (the limit
less its weights, gradients and optimizer state) needs

    T >= m * sum_s A_s R_s / H                                  (Little's law)

Recomputing a stage shrinks its A_s (to the inputs it keeps) but adds a forward to its
backward, which raises the busy-time bounds of `pipefold.plan.bounds`. Taking each stage's
round trip without recomputation (recomputation only lengthens it) makes every rank's terms
depend on its own stages' choice alone, so the least bound over every recompute choice is, per
rank, the least over the subsets of its own stages (2^v, v stages per rank), then the largest
over ranks. `HeldTerms.at(m)` evaluates it for any micro-batch count (docs/decisions.md,
"Planner search").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipefold.plan.bounds import Boundaries, boundary_times, running_sums
from pipefold.plan.stages import StageArrays
from pipefold.simulate import CostModel

__all__ = ["HeldTerms", "held_terms"]

_MAX_SUBSETS = 64
"""Above this many subsets of one rank's stages, each stage's cheapest choice is taken apart
(a weaker bound, still valid)."""


@dataclass(frozen=True)
class HeldTerms:
    """Per rank and recompute choice of its stages: the m-free terms of the memory-aware bound."""

    start: np.ndarray
    """(ranks, 1): the fill before the rank's lowest stage."""
    drain: np.ndarray
    """(ranks, 1): from its lowest stage's backward back to stage 0."""
    busy: np.ndarray
    """(ranks, options): seconds per micro-batch, F + B (or I + W)."""
    chained: np.ndarray
    """(ranks, options): seconds per micro-batch without W."""
    held: np.ndarray
    """(ranks, options): byte-seconds held per micro-batch / headroom bytes."""

    def at(self, num_microbatches: int) -> float:
        m = float(num_microbatches)
        times = np.maximum(np.maximum(self.start + m * self.busy, self.start + m * self.chained + self.drain),
                           m * self.held)
        return float(times.min(axis=1).max()) if times.size else 0.0


def _round_trip(
    model: CostModel, placement: Sequence[int], boundaries: Boundaries | None = None
) -> np.ndarray:
    """Per stage, the least time from the end of its forward to the start of its backward."""
    if boundaries is None:
        boundaries = boundary_times(model, placement)
    f = np.asarray(model.f, dtype=np.float64)
    return _trip(f, np.minimum(np.asarray(model.b, dtype=np.float64), np.asarray(model.i, dtype=np.float64)),
                 boundaries)


def _trip(f: np.ndarray, half: np.ndarray, boundaries: Boundaries) -> np.ndarray:
    """`_round_trip` from the forwards `f` and the input-gradient halves min(B, I): the later
    stages' forwards, halves and the sends both ways, summed from the last stage back (one term
    per stage, as a sequential cumulative sum)."""
    later = f[1:] + half[1:] + boundaries.send + boundaries.back
    trip = np.zeros(len(f), dtype=np.float64)
    trip[:-1] = np.cumsum(later[::-1])[::-1]
    return trip


@functools.lru_cache(maxsize=1024)
def _ranks_of(placement: tuple[int, ...], num_ranks: int
              ) -> tuple[list[int], list[tuple[int, np.ndarray, np.ndarray]], np.ndarray]:
    """For `held_terms`, kept per placement (the search asks for a few thousand terms over a few
    hundred placements): the ranks that own stages; per count of stages, the indices among those
    ranks of the ones owning that many and their stages, (ranks, stages); each one's lowest stage."""
    owned: list[list[int]] = [[] for _ in range(num_ranks)]
    for stage, rank in enumerate(placement):
        owned[rank].append(stage)
    ranks = [rank for rank in range(num_ranks) if owned[rank]]
    counts = [len(owned[rank]) for rank in ranks]
    groups = []
    for num_stages in sorted(set(counts)):
        group = [index for index, count in enumerate(counts) if count == num_stages]
        at = np.array([owned[ranks[index]] for index in group], dtype=np.intp)
        indices = np.array(group, dtype=np.intp)
        for array in (indices, at):
            array.setflags(write=False)
        groups.append((num_stages, indices, at))
    first = np.array([owned[rank][0] for rank in ranks], dtype=np.intp)
    first.setflags(write=False)
    return ranks, groups, first


def held_terms(
    plain: CostModel, recomputed: CostModel | StageArrays, placement: Sequence[int],
    headroom: Sequence[float], allowed: Literal["auto", "none", "full"], boundaries: Boundaries | None = None,
) -> HeldTerms:
    """The terms for `plain` (no stage recomputed) and `recomputed` (every stage: its model, or
    only its times and kept bytes, `pipefold.plan.stages.stage_arrays`), with `headroom`
    bytes per rank for activations; `allowed` which recompute choices the search may take.
    `boundaries`: `boundary_times(plain, placement)` where the caller keeps them."""
    if boundaries is None:
        boundaries = boundary_times(plain, placement)
    ranks, groups, first = _ranks_of(tuple(placement), len(headroom))

    def arrays(model: CostModel | StageArrays) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(table, dtype=np.float64)
                     for table in (model.f, model.b, model.i, model.w, model.activation_bytes))

    kept, recomputed_arrays = arrays(plain), arrays(recomputed)
    half = np.minimum(kept[1], kept[2])
    trip = _trip(kept[0], half, boundaries)
    fill = running_sums(kept[0], boundaries.send)
    drain = running_sums(half, boundaries.back)

    # Each stage's terms once, kept and recomputed, as arrays (the same float operations per stage).
    def per_stage(
        f: np.ndarray, b: np.ndarray, i: np.ndarray, w: np.ndarray, activations: np.ndarray
    ) -> np.ndarray:
        terms = np.empty((len(f), 3), dtype=np.float64)  # (stages, 3)
        terms[:, 0] = f + np.minimum(b, i + w)
        terms[:, 1] = f + np.minimum(b, i)
        terms[:, 2] = activations * trip
        return terms

    kept_terms = per_stage(*kept)
    recomputed_terms = per_stage(*recomputed_arrays)
    rooms = np.array([float(headroom[rank]) for rank in ranks], dtype=np.float64)
    # Per rank, 2 ** its stages options at most (one where each stage is taken apart or the
    # choice is pinned); ranks with fewer options repeat their last one (a duplicate changes no minimum).
    widths = {
        count: 1 if allowed != "auto" or 2 ** count > _MAX_SUBSETS else 2 ** count for count, _, _ in groups
    }
    table = np.zeros((len(ranks), max(widths.values(), default=0), 3), dtype=np.float64)
    # The ranks of one stage count at once: (ranks, options, 3) per group.
    for num_stages, group, at in groups:
        room = rooms[group][:, None]
        # (ranks, stages, 3): busy, chained, held bytes-seconds / headroom, kept and recomputed.
        parts = []
        for terms in (kept_terms, recomputed_terms):
            part = terms[at]
            part[:, :, 2] = np.where(room > 0, part[:, :, 2] / np.where(room > 0, room, 1.0), 0.0)
            parts.append(part)
        if allowed == "none":
            flags: np.ndarray | None = np.zeros((1, num_stages), dtype=bool)
        elif allowed == "full":
            flags = np.ones((1, num_stages), dtype=bool)
        elif 2 ** num_stages > _MAX_SUBSETS:
            flags = None
        else:
            # Every subset, in itertools.product((False, True), repeat=num_stages)'s order.
            codes = np.arange(2 ** num_stages)[:, None] >> np.arange(num_stages - 1, -1, -1)[None, :]
            flags = (codes & 1).astype(bool)
        if flags is None:
            # Each stage apart: the least busy time and the least held bytes need not come together.
            chosen = np.minimum(parts[0], parts[1])[:, None, :, :]
        else:
            chosen = np.where(flags[None, :, :, None], parts[1][:, None, :, :], parts[0][:, None, :, :])
        # Summed stage by stage from 0, as Python's sum (the same floats, not numpy's pairwise sum).
        total = np.zeros((len(group), chosen.shape[1], 3))
        for index in range(num_stages):
            total = total + chosen[:, :, index, :]
        table[group, :total.shape[1]] = total
        table[group, total.shape[1]:] = total[:, -1:]
    return HeldTerms(
        start=fill[first].reshape(-1, 1),
        drain=drain[first].reshape(-1, 1),
        busy=table[:, :, 0], chained=table[:, :, 1], held=table[:, :, 2],
    )
