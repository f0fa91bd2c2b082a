"""The planner's bounds and balance, computed with arrays and narrowed bands, give the very floats
and partitions of the plain loops they replace (kept here as references): `bound_terms` (per rank,
every micro-batch count, any backward kind, links across nodes, shared cores), the held bound's
round trips, and `balance` on many equal layers (where many cuts tie) as well as random ones."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.balance import balance
from pipefold.plan.bounds import Backward, bound_terms, boundary_times
from pipefold.plan.held import _round_trip
from pipefold.simulate import CostModel, Link


def _model(rng: random.Random, num_stages: int, num_ranks: int, cores: bool) -> CostModel:
    def times() -> list[float]:
        # Some equal values, so min() and max() meet ties.
        return [rng.choice([0.0, 1.0, rng.uniform(0.0, 3.0)]) for _ in range(num_stages)]

    overrides = {(a, b): Link(rng.uniform(0, 1e-3), rng.uniform(1e8, 1e10))
                 for a in range(num_ranks) for b in range(num_ranks) if a != b and rng.random() < 0.3}
    return CostModel.from_lists(
        times(), times(), times(), b=times(),
        activation_bytes=[rng.randrange(0, 10**6) for _ in range(num_stages)],
        message_bytes=[rng.choice([0, rng.randrange(1, 10**8)]) for _ in range(num_stages - 1)],
        link=Link(rng.uniform(0, 1e-4), rng.uniform(1e8, 1e11)), link_overrides=overrides,
        num_cores=rng.choice([1.5, 3.0]) if cores else None,
    )


def _bound_reference(model: CostModel, placement: tuple[int, ...], m: int, backward: Backward) -> float:
    """`bound_terms(...).at(m)` as the per-stage loops computed it."""
    b, i, w = model.b, model.i, model.w
    if backward == "B":
        i, w = b, (0.0,) * model.num_stages
    elif backward == "I":
        b = tuple(x + y for x, y in zip(i, w, strict=True))
    num_ranks = max(placement) + 1
    busy = [0.0] * num_ranks
    chained = [0.0] * num_ranks
    first = [model.num_stages] * num_ranks
    for stage, rank in enumerate(placement):
        busy[rank] += model.f[stage] + min(b[stage], i[stage] + w[stage])
        chained[rank] += model.f[stage] + min(b[stage], i[stage])
        first[rank] = min(first[rank], stage)
    fill, drain = [0.0], [0.0]
    for stage in range(model.num_stages):
        send = back = 0.0
        if stage + 1 < model.num_stages:
            send = model.transfer_time(stage, placement[stage], placement[stage + 1])
            back = model.transfer_time(stage, placement[stage + 1], placement[stage])
        fill.append(fill[-1] + model.f[stage] + send)
        drain.append(drain[-1] + min(b[stage], i[stage]) + back)
    bound = fill[-1] + drain[-1]
    total = 0.0
    for rank in range(num_ranks):
        if first[rank] == model.num_stages:
            continue
        start, end = fill[first[rank]], drain[first[rank]]
        bound = max(bound, start + m * busy[rank], start + m * chained[rank] + end)
        total += m * busy[rank]
    if model.num_cores is not None:
        bound = max(bound, total / min(model.num_cores, num_ranks))
    return bound


def _round_trip_reference(model: CostModel, placement: tuple[int, ...]) -> list[float]:
    trip = [0.0] * model.num_stages
    after = 0.0
    for stage in range(model.num_stages - 2, -1, -1):
        send = model.transfer_time(stage, placement[stage], placement[stage + 1])
        back = model.transfer_time(stage, placement[stage + 1], placement[stage])
        later = stage + 1
        after += model.f[later] + min(model.b[later], model.i[later]) + send + back
        trip[stage] = after
    return trip


@settings(max_examples=200, deadline=None)
@given(num_ranks=st.integers(1, 6), num_virtual=st.integers(1, 4), seed=st.integers(0, 2**16),
       cores=st.booleans())
def test_bounds_equal_the_loops(num_ranks: int, num_virtual: int, seed: int, cores: bool) -> None:
    rng = random.Random(seed)
    num_stages = num_ranks * num_virtual
    # Looped or V-shaped placements, and arbitrary ones (a rank may own none).
    placement = rng.choice([
        tuple(stage % num_ranks for stage in range(num_stages)),
        tuple(rng.randrange(num_ranks) for _ in range(num_stages)),
    ])
    model = _model(rng, num_stages, num_ranks, cores)
    boundaries = boundary_times(model, placement)
    for backward in ("B", "I", "any"):
        terms = bound_terms(model, placement, backward)  # type: ignore[arg-type]
        shared = bound_terms(model, placement, backward, boundaries)  # type: ignore[arg-type]
        for m in (1, 3, 17, 512):
            want = _bound_reference(model, placement, m, backward)  # type: ignore[arg-type]
            assert terms.at(m) == want
            assert shared.at(m) == want
    np.testing.assert_array_equal(_round_trip(model, placement), _round_trip_reference(model, placement))


def _balance_band(weights: list[float], num_stages: int, speeds: list[float]) -> tuple[int, ...]:
    """`balance` over its whole band (before it narrowed each pass to the reachable cut points)."""
    num_layers = len(weights)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])
    segment = prefix[None, :] - prefix[:, None]
    forward = np.triu(np.ones((num_layers + 1, num_layers + 1), dtype=bool), k=1)
    by_speed = {speed: np.where(forward, segment / speed, np.inf) for speed in set(speeds)}
    costs = [by_speed[speed] for speed in speeds]
    spare = num_layers - num_stages
    best = np.full(spare + 1, np.inf)
    best[0] = 0.0
    for stage, cost in enumerate(costs):
        best = np.maximum(best[:, None],
                          cost[stage:stage + spare + 1, stage + 1:stage + spare + 2]).min(axis=0)
    bottleneck = best[spare]
    allowed = {speed: np.where(cost <= bottleneck, cost**2, np.inf) for speed, cost in by_speed.items()}
    squares = np.full(spare + 1, np.inf)
    squares[0] = 0.0
    starts = []
    for stage, speed in enumerate(speeds):
        total = squares[:, None] + allowed[speed][stage:stage + spare + 1, stage + 1:stage + spare + 2]
        squares = total.min(axis=0)
        starts.append(stage + spare - np.argmax((total == squares[None, :])[::-1], axis=0))
    bounds = [num_layers]
    for stage in range(num_stages - 1, -1, -1):
        bounds.append(int(starts[stage][bounds[-1] - stage - 1]))
    return tuple(reversed(bounds))


@settings(max_examples=150, deadline=None)
@given(num_layers=st.integers(1, 140), seed=st.integers(0, 2**16), data=st.data())
def test_balance_equals_the_whole_band(num_layers: int, seed: int, data: st.DataObject) -> None:
    rng = random.Random(seed)
    # A transformer's shape (an embedding, many equal blocks, a head: many tied cuts), or anything.
    kind = data.draw(st.sampled_from(["blocks", "random", "zeros"]))
    if kind == "blocks":
        block = rng.uniform(0.5, 5.0)
        weights = [rng.uniform(0, 3)] + [block] * (num_layers - 2) + [rng.uniform(0, 3)]
        weights = weights[:num_layers]
    elif kind == "random":
        weights = [rng.choice([0.0, rng.uniform(0.0, 10.0), 10.0 ** rng.randint(-6, 3)])
                   for _ in range(num_layers)]
    else:
        weights = [0.0] * num_layers
    num_stages = data.draw(st.integers(1, num_layers))
    speeds = data.draw(st.one_of(st.none(), st.lists(st.sampled_from([0.5, 1.0, 1.5, 3.0]),
                                                     min_size=num_stages, max_size=num_stages)))
    assert balance(weights, num_stages, speeds).bounds == _balance_band(weights, num_stages,
                                                                         speeds or [1.0] * num_stages)
