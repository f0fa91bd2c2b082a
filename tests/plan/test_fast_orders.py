"""The planner's fast paths give what the slow ones they replace give, for every family they cover:
the integer orders of `pipefold.plan.fast_orders` equal the families' `generate`, the compiled
schedule built from them times as the one built from the `Schedule`, and the held counts and
backward kind read from them equal those read from the `Action`s (hypothesis over ranks,
micro-batches and virtual stages)."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.plan.bounds import backward_kind
from pipefold.plan.costs import ModelCosts
from pipefold.plan.fast_orders import (
    Order,
    fast_families,
    fast_order,
    fast_placement,
    order_of,
    sorted_unique,
)
from pipefold.plan.orders import _backward_of, _distinct_rows, held_counts_of
from pipefold.plan.stages import _F, _FIXED, _I, _PARAM, _W, StageLayout
from pipefold.schedule import Schedule, build
from pipefold.schedule.ir import Action, Op
from pipefold.schedule.registry import family
from pipefold.simulate import CostModel, Link
from pipefold.simulate.compiled import CompiledSchedule

_SIZES = st.tuples(st.integers(1, 8), st.integers(1, 24), st.integers(1, 4))


def _legal(name: str, p: int, m: int, v: int) -> Schedule | None:
    try:
        family(name).check(p, m, v)
        return build(name, num_ranks=p, num_microbatches=m, num_virtual=v)
    except ScheduleError:
        return None


def _same(a: Order, b: Order) -> bool:
    return (a.name, a.num_ranks, a.num_stages, a.num_microbatches, a.placement, a.weight_update) == (
        b.name, b.num_ranks, b.num_stages, b.num_microbatches, b.placement, b.weight_update) and all(
        np.array_equal(x, y) for row_a, row_b in zip(a.rows, b.rows, strict=True)
        for x, y in zip(row_a, row_b, strict=True))


def _held_counts_reference(schedule: Schedule) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """The held counts as the planner read them from `Action`s before the integer orders."""
    deltas = {Op.F: ((0, 1),), Op.B: ((0, -1),), Op.I: ((0, -1), (1, 1)), Op.W: ((1, -1),)}
    result = []
    for row in schedule.actions:
        stages = sorted({action.stage for action in row})
        column = {stage: index for index, stage in enumerate(stages)}
        width = len(stages)
        vector = [0] * (2 * width)
        seen = {tuple(vector)}
        for action in row:
            if action.op not in deltas:
                continue
            for offset, change in deltas[action.op]:
                vector[column[action.stage] + offset * width] += change
            seen.add(tuple(vector))
        table = np.array(sorted(seen), dtype=np.float64).reshape(len(seen), 2 * width)
        result.append((tuple(stages), table))
    return result


def _costs(rng: random.Random, num_stages: int, num_ranks: int) -> CostModel:
    def draw() -> list[float]:
        return [rng.uniform(0.1, 2.0) for _ in range(num_stages)]

    return CostModel.from_lists(
        draw(), draw(), draw(), b=draw(),
        activation_bytes=[rng.randrange(0, 1000) for _ in range(num_stages)],
        weight_grad_bytes=[rng.randrange(0, 500) for _ in range(num_stages)],
        message_bytes=[rng.randrange(0, 10_000) for _ in range(num_stages - 1)],
        link=Link(rng.uniform(0, 0.2), rng.uniform(1e3, 1e6)),
        link_overrides={(0, num_ranks - 1): Link(0.3, 1e4)} if num_ranks > 1 else {},
        action_overhead=rng.choice([0.0, 0.01]),
    )


@pytest.mark.parametrize("name", fast_families())
@settings(max_examples=20, deadline=None)
@given(sizes=_SIZES, seed=st.integers(0, 2**16))
def test_fast_paths_equal_the_slow_paths(name: str, sizes: tuple[int, int, int], seed: int) -> None:
    p, m, v = sizes
    schedule = _legal(name, p, m, v)
    if schedule is None:
        return
    fast = fast_order(name, p, m, v)
    assert fast is not None
    assert _same(fast, order_of(schedule))
    assert fast_placement(name, p, v) == schedule.placement
    # The held counts and backward kind the search reads.
    for (stages, counts), (want_stages, want) in zip(held_counts_of(fast), _held_counts_reference(schedule),
                                                     strict=True):
        assert stages == want_stages
        np.testing.assert_array_equal(counts, want)
    assert _backward_of(fast) == backward_kind(schedule)
    # The compiled schedule from the arrays (and a header without actions) times as the one from `Action`s.
    compiled = CompiledSchedule(fast.shell(), fast.rows)
    reference = CompiledSchedule(schedule)
    costs = _costs(random.Random(seed), schedule.num_stages, p)
    assert compiled.run(costs) == reference.run(costs)
    assert compiled.order_activation_peaks(costs) == reference.order_activation_peaks(costs)


def test_the_v_rows_from_patterns_equal_the_builders() -> None:
    """zb-v's and dualpipe-v's rows built from repeated patterns equal their families' per-action
    builders at every rank, over ranks and the micro-batch counts they are generated for."""
    from pipefold.plan.fast_orders import _dualpipe_v_row, _row, _zb_v_row
    from pipefold.schedule.families.dualpipe_v import rank_order as dualpipe_v_order
    from pipefold.schedule.families.zb_v import rank_order as zb_v_order

    for p in range(1, 10):
        for extra in range(12):
            for rank in range(p):
                zb_v_m, dualpipe_m = 2 * p - 1 + extra, 2 * p + extra
                for fast, slow in ((_zb_v_row(p, zb_v_m, rank), zb_v_order(p, zb_v_m, rank)),
                                   (_dualpipe_v_row(p, dualpipe_m, rank),
                                    dualpipe_v_order(p, dualpipe_m, rank))):
                    for got, want in zip(fast, _row(*slow), strict=True):
                        np.testing.assert_array_equal(got, want)


def test_the_fast_families_are_the_flush_families_the_planner_times_most() -> None:
    assert set(fast_families()) >= {"1f1b", "interleaved-1f1b", "gpipe", "zb-h1", "zb-h2", "zb-v", "v-min",
                                    "v-half"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=5), min_size=1, max_size=40).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_distinct_rows_equal_numpy_unique(rows: list[list[int]]) -> None:
    table = np.array(rows, dtype=np.int64)
    np.testing.assert_array_equal(_distinct_rows(table), np.unique(table, axis=0))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**62), 2**62), max_size=60))
def test_sorted_unique_equals_numpy_unique(values: list[int]) -> None:
    array = np.array(values, dtype=np.int64)
    got = sorted_unique(array)
    np.testing.assert_array_equal(got, np.unique(array))
    assert got.dtype == np.unique(array).dtype


def test_compiled_rows_keep_the_errors() -> None:
    twice = Schedule("twice", 1, 1, 2, (0,), ((Action(Op.F, 0, 0), Action(Op.F, 0, 0)),))
    with pytest.raises(ScheduleError, match="appears twice"):
        CompiledSchedule(twice)
    orphan = Schedule("orphan", 2, 2, 1, (0, 1),
                      ((Action(Op.F, 0, 0), Action(Op.B, 0, 0)), (Action(Op.B, 1, 0),)))
    with pytest.raises(ScheduleError, match=r"orphan: B1.0 needs F1.0, which no rank runs"):
        CompiledSchedule(orphan)
    no_grad = Schedule("no_grad", 2, 2, 1, (0, 1),
                       ((Action(Op.F, 0, 0), Action(Op.B, 0, 0)), (Action(Op.F, 1, 0),)))
    with pytest.raises(ScheduleError, match=r"no_grad: B0.0 needs B1.0"):
        CompiledSchedule(no_grad)
    no_i = Schedule("no_i", 1, 1, 1, (0,), ((Action(Op.F, 0, 0), Action(Op.W, 0, 0)),))
    with pytest.raises(ScheduleError, match=r"no_i: W0.0 needs I0.0"):
        CompiledSchedule(no_i)


def _held_terms_reference(plain, recomputed, placement, headroom, allowed):  # type: ignore[no-untyped-def]
    """`pipefold.plan.held.held_terms` as it was before its terms were summed as arrays."""
    import itertools

    from pipefold.plan.held import _MAX_SUBSETS, _round_trip
    num_ranks = len(headroom)
    trip = _round_trip(plain, placement)
    owned: list[list[int]] = [[] for _ in range(num_ranks)]
    for stage, rank in enumerate(placement):
        owned[rank].append(stage)

    def per_stage(model, stage, room):  # type: ignore[no-untyped-def]
        b, i, w = model.b[stage], model.i[stage], model.w[stage]
        held = model.activation_bytes[stage] * trip[stage] / room if room > 0 else 0.0
        return model.f[stage] + min(b, i + w), model.f[stage] + min(b, i), held

    rows = []
    for rank in range(num_ranks):
        stages = owned[rank]
        if not stages:
            continue
        room = float(headroom[rank])
        choices = {"none": [(False,) * len(stages)], "full": [(True,) * len(stages)]}.get(allowed)
        parts = [(per_stage(plain, s, room), per_stage(recomputed, s, room)) for s in stages]
        options = []
        if choices is None and 2 ** len(stages) > _MAX_SUBSETS:
            options.append((sum(min(a[0], b[0]) for a, b in parts), sum(min(a[1], b[1]) for a, b in parts),
                            sum(min(a[2], b[2]) for a, b in parts)))
        else:
            for flags in choices or itertools.product((False, True), repeat=len(stages)):
                terms = [part[1] if flag else part[0] for part, flag in zip(parts, flags, strict=True)]
                options.append((sum(t[0] for t in terms), sum(t[1] for t in terms), sum(t[2] for t in terms)))
        rows.append(options)
    width = max((len(options) for options in rows), default=0)
    return [options + [options[-1]] * (width - len(options)) for options in rows]


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(["1f1b", "interleaved-1f1b", "zb-v", "looped-bfs"]), p=st.integers(1, 6),
       v=st.integers(1, 7), allowed=st.sampled_from(["auto", "none", "full"]), seed=st.integers(0, 2**16),
       tight=st.booleans())
def test_held_terms_equal_the_per_stage_sums(name: str, p: int, v: int, allowed: str, seed: int,
                                            tight: bool) -> None:
    from pipefold.plan.held import held_terms
    schedule = _legal(name, p, 2, v)
    if schedule is None:
        return
    rng = random.Random(seed)
    plain = _costs(rng, schedule.num_stages, p)
    recomputed = _costs(rng, schedule.num_stages, p)
    headroom = [rng.uniform(-100, 5000) if tight else rng.uniform(1, 1e6) for _ in range(p)]
    terms = held_terms(plain, recomputed, schedule.placement, headroom, allowed)  # type: ignore[arg-type]
    want = np.array(_held_terms_reference(plain, recomputed, schedule.placement, headroom, allowed))
    for got, column in ((terms.busy, 0), (terms.chained, 1), (terms.held, 2)):
        np.testing.assert_array_equal(got, want[:, :, column])


def _balance_reference(weights: list[float], num_stages: int, speeds: list[float]) -> tuple[int, ...]:
    """`pipefold.balance.balance` as it was before its second pass shared the squared costs."""
    num_layers = len(weights)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])
    segment = prefix[None, :] - prefix[:, None]
    forward = np.triu(np.ones((num_layers + 1, num_layers + 1), dtype=bool), k=1)
    by_speed = {speed: np.where(forward, segment / speed, np.inf) for speed in set(speeds)}
    costs = [by_speed[speed] for speed in speeds]
    best = np.full(num_layers + 1, np.inf)
    best[0] = 0.0
    for cost in costs:
        best = np.maximum(best[:, None], cost).min(axis=0)
    bottleneck = best[num_layers]
    squares = np.full(num_layers + 1, np.inf)
    squares[0] = 0.0
    starts = []
    for cost in costs:
        total = np.where(cost <= bottleneck, squares[:, None] + cost**2, np.inf)
        squares = total.min(axis=0)
        is_best = np.isfinite(total) & (total == squares[None, :])
        starts.append(num_layers - np.argmax(is_best[::-1], axis=0))
    bounds = [num_layers]
    for stage_starts in reversed(starts):
        bounds.append(int(stage_starts[bounds[-1]]))
    return tuple(reversed(bounds))


@settings(max_examples=150, deadline=None)
@given(weights=st.lists(st.one_of(st.sampled_from([0.0, 1.0, 2.0]), st.floats(0.0, 10.0)),
                       min_size=1, max_size=30),
       data=st.data())
def test_balance_equals_the_reference(weights: list[float], data: st.DataObject) -> None:
    from pipefold.balance import balance
    num_stages = data.draw(st.integers(1, len(weights)))
    speeds = data.draw(st.one_of(st.none(), st.lists(st.sampled_from([0.5, 1.0, 1.5]), min_size=num_stages,
                                                       max_size=num_stages)))
    want = _balance_reference(weights, num_stages, speeds or [1.0] * num_stages)
    assert balance(weights, num_stages, speeds).bounds == want


# -- stage_cost_model: the per-stage loop it replaced, as the reference

def _stage_cost_model_reference(  # type: ignore[no-untyped-def]
    costs: ModelCosts,
    layout: StageLayout,
    recompute: Collection[int],
    link: Link,
    num_cores: float | None = None,
    link_overrides: Sequence[tuple[tuple[int, int], Link]] = (),
    stage_speeds: Sequence[float] | None = None,
) -> CostModel:
    """The simulator's costs for `layout`, stages in `recompute` recomputed (docs/decisions.md,
    "Recompute model"); `num_cores` where the ranks share cores (docs/decisions.md, "Shared
    cores"); `link_overrides`: (rank, rank) pairs whose sends take another link (across nodes).
    `stage_speeds`: per stage, its rank's device speed on a mix of device kinds: the stage's work
    takes 1 / speed as long; fixed costs per call (overhead, all-reduce latency) do not change."""
    overhead = costs.overhead_s
    # Bytes scale with rows; times with rows and the device's speed.
    rows_scale = layout.rows / costs.reference_rows
    f, i, w, b, activations, held_for_w, weights = [], [], [], [], [], [], []
    for stage in range(layout.num_stages):
        start, stop = layout.bounds[stage], layout.bounds[stage + 1]
        scale = rows_scale if stage_speeds is None else rows_scale / stage_speeds[stage]
        fixed = overhead * (stop - start)
        # The layers' own fixed seconds (a tp all-reduce's latency) come with F and with the
        # input-gradient half, where the all-reduces run; W has none.
        own = costs.span(_FIXED, start, stop)
        forward = fixed + own + scale * costs.span(_F, start, stop)
        input_grad = fixed + own + scale * costs.span(_I, start, stop)
        weight_grad = fixed + scale * costs.span(_W, start, stop)
        # One B per layer is one action: its fixed cost is paid once, not once per half.
        backward = fixed + own + scale * (costs.span(_I, start, stop) + costs.span(_W, start, stop))
        if stage in recompute:
            input_grad, weight_grad = input_grad + forward, weight_grad + forward
            backward += forward
            kept = round(rows_scale * sum(costs.stage_kept_input_bytes(start, stop)))
        else:
            kept = round(rows_scale * sum(costs.stage_activation_bytes(start, stop)))
        if stage == layout.num_stages - 1 and stop == len(costs.layers):
            kept += round(rows_scale * costs.loss_bytes)
        activations.append(kept)
        held_for_w.append(kept)
        f.append(forward)
        i.append(input_grad)
        w.append(weight_grad)
        b.append(backward)
        weights.append(round(costs.span(_PARAM, start, stop)))
    messages = [round(rows_scale * costs.layers[stop - 1].output_bytes) for stop in layout.bounds[1:-1]]
    return CostModel.from_lists(
        f, i, w, b=b, activation_bytes=activations, weight_grad_bytes=held_for_w, weight_bytes=weights,
        message_bytes=messages, link=link, num_cores=num_cores, link_overrides=dict(link_overrides),
    )



@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**16), num_layers=st.integers(1, 12), data=st.data())
def test_stage_cost_model_equals_the_per_stage_loop(seed: int, num_layers: int, data: st.DataObject) -> None:
    from pipefold.plan.costs import LayerCost, ModelCosts
    from pipefold.plan.stages import StageLayout, stage_cost_model
    rng = random.Random(seed)
    layers = tuple(LayerCost(forward_s=rng.uniform(0, 2), backward_s=rng.uniform(0, 4),
                             activation_bytes=rng.randrange(0, 10**9), output_bytes=rng.randrange(0, 10**7),
                             parameter_bytes=rng.randrange(0, 10**9),
                             fixed_s=rng.choice([0.0, rng.uniform(0, 1)]),
                             # Outputs inside a stage in another dtype than across a boundary, or not.
                             stage_output_bytes=rng.choice([None, rng.randrange(0, 10**7)]),
                             stage_output_bytes_from_boundary=rng.choice([None, rng.randrange(0, 10**7)]),
                             activation_bytes_from_boundary=rng.choice([None, rng.randrange(0, 10**9)]))
                   for _ in range(num_layers))
    costs = ModelCosts(layers=layers, reference_rows=rng.choice([1, 2, 4]),
                       input_bytes=rng.randrange(0, 10**6), overhead_s=rng.uniform(0, 0.1),
                       loss_bytes=rng.randrange(0, 10**6))
    num_stages = data.draw(st.integers(1, num_layers))
    cuts = sorted(data.draw(st.lists(st.integers(1, num_layers - 1), min_size=num_stages - 1,
                                     max_size=num_stages - 1, unique=True))) if num_layers > 1 else []
    layout = StageLayout((0, *cuts, num_layers), data.draw(st.integers(1, 8)))
    recompute = data.draw(st.lists(st.integers(0, layout.num_stages - 1), unique=True))
    speeds = data.draw(st.one_of(st.none(), st.lists(st.sampled_from([0.5, 1.0, 1.25]),
                                                     min_size=layout.num_stages, max_size=layout.num_stages)))
    link = Link(0.01, 1e9)
    overrides = (((0, 1), Link(0.1, 1e8)),)
    got = stage_cost_model(costs, layout, tuple(recompute), link, None, overrides, speeds)
    want = _stage_cost_model_reference(costs, layout, tuple(recompute), link, None, overrides, speeds)
    assert got == want


def test_compiled_deadlock_names_the_stuck_rank() -> None:
    stuck = Schedule("stuck", 2, 2, 1, (0, 1), ((Action(Op.F, 0, 0), Action(Op.B, 0, 0)),
                                                (Action(Op.B, 1, 0), Action(Op.F, 1, 0))))
    with pytest.raises(ScheduleError, match=r"stuck: simulation deadlocked at rank 0, B0"):
        CompiledSchedule(stuck)


def test_the_shared_integer_generators_number_kinds_as_the_compiled_rows() -> None:
    """dualpipe-v's, zb-v's and the greedy V's integer rows are read by `fast_order` as they are."""
    from pipefold.schedule.families import _common
    from pipefold.simulate.compiled import KINDS

    numbers = (_common.KIND_F, _common.KIND_B, _common.KIND_I, _common.KIND_W)
    assert tuple(KINDS[number] for number in numbers) == (Op.F, Op.B, Op.I, Op.W)
    assert _common.actions_of(([0, 1, 2, 3], [0, 1, 2, 3], [4, 5, 6, 7])) == [
        Action(Op.F, 0, 4), Action(Op.B, 1, 5), Action(Op.I, 2, 6), Action(Op.W, 3, 7)]


def test_packed_held_counts_equal_the_table_of_count_vectors() -> None:
    """The held counts summed as packed integers equal those from the table of count vectors, on
    random rows (negative counts included: there the packing declines and the table answers)."""
    from pipefold.plan.orders import _held_counts_of_row, _packed_held_counts

    rng = np.random.default_rng(7)
    declined = 0
    for trial in range(200):
        size = int(rng.integers(0, 60))
        kinds = rng.integers(0, 5, size).astype(np.int64)
        if trial % 2:  # valid-looking rows: forwards first, so no count goes below zero
            kinds = np.sort(kinds)
        stages_of = rng.choice([3, 7, 11], size).astype(np.int64)
        packed = _packed_held_counts(kinds, stages_of)
        want_stages, want = _held_counts_of_row(kinds, stages_of)
        if packed is None:
            declined += 1
            continue
        stages, counts = packed
        assert stages == want_stages
        np.testing.assert_array_equal(counts, want)
        assert counts.dtype == want.dtype
        # The same up to the row's first backward and from its end on (`split_held_counts`).
        for part in ("before", "after"):
            half = _packed_held_counts(kinds, stages_of, part)
            want_stages, want = _held_counts_of_row(kinds, stages_of, part)
            assert half is not None and half[0] == want_stages
            np.testing.assert_array_equal(half[1], want)
    assert 0 < declined < 200
