"""Per-layer costs summed into the simulator's per-stage `CostModel`, with or without recompute.

Recompute is per stage, as `LayoutOptions(recompute=...)` runs it (docs/decisions.md,
"Recompute model").
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from pipefold.plan.costs import ModelCosts
from pipefold.plan.row_scales import row_scale
from pipefold.simulate import CostModel, Link

__all__ = [
    "StageLayout", "StageArrays", "stage_arrays", "stage_cost_model", "tied_weights", "transient_bytes",
    "stage_weights",
]

_F, _I, _W, _ACT, _PARAM, _FIRST_INPUT, _FIXED, _CAST, _SAVED_CAST, _NO_DECAY = range(10)


@dataclass(frozen=True)
class StageLayout:
    """A partition of the layers and the micro-batch rows the costs are scaled to."""

    bounds: tuple[int, ...]
    """Virtual stage s owns layers [bounds[s], bounds[s + 1])."""
    rows: int
    """Samples per micro-batch."""

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1


def stage_weights(costs: ModelCosts, rows: int) -> list[float]:
    """Per layer, F + B seconds at `rows` samples: what the balance DP evens out across stages."""
    scale = rows / costs.reference_rows
    return [
        2 * (costs.overhead_s + layer.fixed_s) + scale * (layer.forward_s + layer.backward_s)
        for layer in costs.layers
    ]


@dataclass(frozen=True)
class StageArrays:
    """Per stage, the times and kept activation bytes of `stage_cost_model`'s `CostModel`, as
    arrays: what the planner's bounds read, without building (and validating) a whole model."""

    f: np.ndarray
    i: np.ndarray
    w: np.ndarray
    b: np.ndarray
    activation_bytes: np.ndarray
    """int64: rounded as the model's."""


def stage_arrays(
    costs: ModelCosts,
    layout: StageLayout,
    recompute: Collection[int],
    stage_speeds: Sequence[float] | None = None,
) -> StageArrays:
    """The per-stage times and kept bytes of `stage_cost_model(costs, layout, recompute, ...,
    stage_speeds=stage_speeds)`: the same floats."""
    # Per stage, as arrays: each stage's value is the same float expression as one stage at a time.
    bounds = np.asarray(layout.bounds, dtype=np.intp)
    starts, stops = bounds[:-1], bounds[1:]
    prefix = costs.prefix_array

    def span(kind: int) -> np.ndarray:
        result: np.ndarray = prefix[kind][stops] - prefix[kind][starts]
        return result

    # Bytes scale with rows; times with rows and the device's speed.
    rows_scale = layout.rows / costs.reference_rows
    scale = np.full(layout.num_stages, rows_scale) if stage_speeds is None else (
        rows_scale / np.asarray(stage_speeds, dtype=np.float64))
    fixed = costs.overhead_s * (stops - starts)
    # The layers' own fixed seconds (a tp all-reduce's latency) come with F and with the
    # input-gradient half, where the all-reduces run; W has none.
    own = span(_FIXED)
    if costs.row_scales:
        # Between the sizes a calibration run measured, its measured time of the layers over the
        # line's; the runtime's seconds per layer and per split action are not scaled.
        forward_scale, backward_scale = row_scale(costs.row_scales, layout.rows)
        forward = fixed + forward_scale * (own + scale * span(_F))
        input_grad = (fixed + costs.split_overhead_s) + backward_scale * (own + scale * span(_I))
        weight_grad = (fixed + costs.split_overhead_s) + backward_scale * scale * span(_W)
        backward = fixed + backward_scale * (own + scale * (span(_I) + span(_W)))
    else:
        forward = (fixed + own) + scale * span(_F)
        # A split backward's I and W each pay the second entry into the backward (split_overhead_s).
        input_grad = (fixed + own + costs.split_overhead_s) + scale * span(_I)
        weight_grad = (fixed + costs.split_overhead_s) + scale * span(_W)
        # One B per layer is one action: its fixed cost is paid once, not once per half.
        backward = (fixed + own) + scale * (span(_I) + span(_W))
    if costs.split_backward_share:
        # The split's seconds that grow with the stage's work (`ModelCosts.split_backward_share`).
        own_split = costs.split_backward_share * (backward - fixed)
        input_grad = input_grad + own_split
        weight_grad = weight_grad + own_split
    recomputed = np.zeros(layout.num_stages, dtype=bool)
    recomputed[[stage for stage in recompute if 0 <= stage < layout.num_stages]] = True
    input_grad = np.where(recomputed, input_grad + forward, input_grad)
    weight_grad = np.where(recomputed, weight_grad + forward, weight_grad)
    backward = np.where(recomputed, backward + forward, backward)
    # A recomputed stage keeps each layer's input, the others what their forwards save, each in
    # the dtype it has inside the stage (`pipefold.plan.in_stage`).
    inputs = costs.in_stage.stage_bytes(starts, stops)
    saved = costs.in_stage.stage_activations(starts, stops)
    kept = np.rint(rows_scale * np.where(recomputed, inputs, saved)).astype(np.int64)
    if layout.bounds[-1] == len(costs.layers):
        kept[-1] += round(rows_scale * costs.loss_bytes)
    return StageArrays(forward, input_grad, weight_grad, backward, kept)


def stage_cost_model(
    costs: ModelCosts,
    layout: StageLayout,
    recompute: Collection[int],
    link: Link,
    num_cores: float | None = None,
    link_overrides: Sequence[tuple[tuple[int, int], Link]] = (),
    stage_speeds: Sequence[float] | None = None,
    memory_bandwidth: float = math.inf,
) -> CostModel:
    """The simulator's costs for `layout`, stages in `recompute` recomputed (docs/decisions.md,
    "Recompute model"); `num_cores` where the ranks share cores (docs/decisions.md, "Shared
    cores"); `link_overrides`: (rank, rank) pairs whose sends take another link (across nodes).
    `stage_speeds`: per stage, its rank's device speed on a mix of device kinds: the stage's work
    takes 1 / speed as long; fixed costs per call (overhead, all-reduce latency) do not change.
    `memory_bandwidth`: the device's, at which the tied owners add their gradients (inf: free)."""
    arrays = stage_arrays(costs, layout, recompute, stage_speeds)
    bounds = np.asarray(layout.bounds, dtype=np.intp)
    kept = arrays.activation_bytes.tolist()
    weights = np.rint(costs.prefix_array[_PARAM][bounds[1:]] - costs.prefix_array[_PARAM][bounds[:-1]]
                      ).astype(np.int64).tolist()
    # Each stage's weight copies from its own layers, where they carry them (else `rank_memory`
    # prices a rank's by the model's one ratio).
    casts = np.rint(costs.prefix_array[_CAST][bounds[1:]] - costs.prefix_array[_CAST][bounds[:-1]]).astype(
        np.int64).tolist() if costs.casts_per_layer else []
    # The weights' part without weight decay, where the layers carry it (the update's group split).
    no_decay = np.rint(costs.prefix_array[_NO_DECAY][bounds[1:]] - costs.prefix_array[_NO_DECAY][bounds[:-1]]
                       ).astype(np.int64).tolist()
    norms: list[int] = []
    if costs.norms_per_layer:
        # Each stage's largest layer norm (0 for a stage without layers).
        starts, stops = bounds[:-1], bounds[1:]
        largest = np.maximum.reduceat(costs.norm_array, starts)
        norms = np.where(stops > starts, largest, 0).tolist()
    copies = tied_weights(costs, layout.bounds, costs.tied_copies)
    for counts, size in copies:
        for stage, count in counts:  # a stage's forward casts a tied weight once (autocast's cache)
            casts[stage] -= (count - 1) * size
    rows_scale = layout.rows / costs.reference_rows
    messages = [round(rows_scale * costs.layers[stop - 1].output_bytes) for stop in layout.bounds[1:-1]]
    temporaries = backward_temporaries(costs, layout, recompute)
    return CostModel.from_lists(
        arrays.f.tolist(), arrays.i.tolist(), arrays.w.tolist(), b=arrays.b.tolist(), activation_bytes=kept,
        weight_grad_bytes=list(kept), weight_bytes=weights, cast_bytes=casts, message_bytes=messages,
        link=link, num_cores=num_cores,
        link_overrides=dict(link_overrides), action_overhead=costs.action_overhead_s,
        send_overhead=costs.send_overhead_s, send_seconds_per_byte=costs.send_s_per_byte,
        tied_weights=tied_weights(costs, layout.bounds), tied_sum_bandwidth=memory_bandwidth,
        tied_casts=copies, no_decay_weight_bytes=no_decay, gradient_norm_bytes=norms,
        backward_temporary_bytes=temporaries,
    )


def backward_temporaries(costs: ModelCosts, layout: StageLayout, recompute: Collection[int] = ()
                         ) -> list[int]:
    """Per stage, the most its backward of one micro-batch holds at once beyond that micro-batch's
    kept activations (`CostModel.backward_temporary_bytes`; empty where no layer and no loss has
    temporaries). The backward runs its layers last to first, one at a time: at layer L's it holds
    L's temporaries (`LayerCost.backward_temporary_at` the layout's rows) and, where the stage is
    recomputed, L's rebuilt activations, while what the layers above L kept (and the loss's
    saved log-probabilities) is freed already; before them the loss's backward holds its own
    (`ModelCosts.loss_backward_bytes`) with nothing freed. The largest such moment, at least 0."""
    if not costs.loss_backward_bytes and not any(layer.backward_temporary_bytes for layer in costs.layers):
        return []
    rows_scale = layout.rows / costs.reference_rows
    layers = costs.layers
    # Where only the loss has temporaries, a layer's moment is its rebuilt activations less what
    # was freed: at most the rank's recompute transient, which `RankMemory.temporary` subtracts, so
    # such a stage prices the loss's alone, as no walk at all would.
    recomputed = set(recompute)
    found = []
    for stage, (start, stop) in enumerate(zip(layout.bounds[:-1], layout.bounds[1:], strict=True)):
        ends_model = stop == len(layers)
        freed = round(rows_scale * costs.loss_bytes) if ends_model else 0
        most = round(rows_scale * costs.loss_backward_bytes) if ends_model else 0
        # A checkpointed layer keeps its input (if it saves anything), in its in-stage dtype.
        inputs = costs.stage_kept_input_bytes(start, stop) if stage in recomputed else []
        saved = costs.stage_activation_bytes(start, stop)
        for index in range(stop - 1, start - 1, -1):
            layer = layers[index]
            rebuilt = round(rows_scale * saved[index - start]) if stage in recomputed else 0
            most = max(most, layer.backward_temporary_at(rows_scale) + rebuilt - freed)
            kept = inputs[index - start] if stage in recomputed else saved[index - start]
            freed += round(rows_scale * kept)
        found.append(max(most, 0))
    return found


def tied_weights(
    costs: ModelCosts, bounds: Sequence[int],
    groups: Sequence[tuple[Sequence[int], int]] | None = None,
) -> tuple[tuple[tuple[tuple[int, int], ...], int], ...]:
    """`costs.tied_layers` cut at `bounds` (`CostModel.tied_weights`): per tied weight, ((stage, its
    layers there), ...) and its bytes (`ModelCosts.tied_bytes`); layers outside the bounds are
    held by no stage. `groups`: other (layers, bytes) to cut instead (`ModelCosts.tied_copies`:
    `CostModel.tied_casts`)."""
    found = []
    if groups is None:
        groups = tuple(zip(costs.tied_layers, costs.tied_bytes, strict=True))
    for group, size in groups:
        inside = [layer for layer in group if bounds[0] <= layer < bounds[-1]]
        if inside:
            counts = Counter(bisect.bisect_right(bounds, layer) - 1 for layer in inside)
            found.append((tuple(sorted(counts.items())), size))
    return tuple(found)


def transient_bytes(
    costs: ModelCosts,
    layout: StageLayout,
    recompute: Collection[int],
    placement: Sequence[int],
    num_ranks: int,
    copies: Sequence[int] = (),
) -> tuple[int, ...]:
    """Per rank, the largest one-layer activation a recomputing backward rebuilds for a moment.
    `copies`: per layer, the 16-bit weight copies its rerun forward makes and holds with that
    activation where no casts are held for the step (`pipefold.plan.precision_costs.rerun_copies`;
    whole weights: they do not scale with the rows); empty: none."""
    scale = layout.rows / costs.reference_rows
    peaks = [0] * num_ranks
    for stage in recompute:
        start, stop = layout.bounds[stage], layout.bounds[stage + 1]
        saved = costs.stage_activation_bytes(start, stop)
        largest = max(round(scale * saved[index - start]) + (copies[index] if copies else 0)
                      for index in range(start, stop))
        rank = placement[stage]
        peaks[rank] = max(peaks[rank], largest)
    return tuple(peaks)
