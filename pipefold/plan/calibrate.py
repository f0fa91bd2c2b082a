"""Measured costs made to extrapolate over rows, and the step's costs outside the actions.

    costs = with_fixed_costs(ModelCosts.from_profile(at_4, rows=4), ModelCosts.from_profile(at_1, rows=1))
    costs = replace(costs, action_overhead_s=..., update_s_per_parameter_byte=...)  # measured by the runtime
    update_time(costs, weights_per_rank)   # seconds the step spends on the optimizer update
    model = first_stage_backward(stage_cost_model(costs, layout, ...), costs, layout.bounds)

The planner scales a layer's measured time linearly with the micro-batch's rows
(docs/decisions.md, "Cost scaling"). A layer of small tensors is not linear: every call pays
its torch calls' fixed cost whatever the rows, so costs measured at 4 rows, scaled to 1 row,
price one-row micro-batches too cheaply and many micro-batches look free. `with_fixed_costs`
takes the same layers measured at two row counts and splits each layer's F and B into a fixed
part per call (`LayerCost.fixed_s`) and a part per row, which reproduces both measurements'
F + B (docs/decisions.md, "Fixed cost per call").

Each layer's I is profiled with a float input that takes a gradient, but the first stage of a
model fed token ids has no input gradient to compute: the runtime's I of that stage only
enters and leaves and its W runs the whole backward (docs/plan.md, "What the one-process
profile misprices"). `first_stage_backward` moves that stage's I, but for its fixed cost per
call, into its W (B is unchanged), so the simulator places the first stage's backward work
where the runtime runs it.

`at_run_prices` prices the layers as a short run of `pipefold train` measured them: a profile
taken in one process moves by a quarter between two runs on the same quiet host, while the
runtime's own stage costs predict its steps (docs/plan.md, "Forecast and measurement"). Where
the run measured its stages at several micro-batch sizes, each stage's F and B are fitted as a
line over rows (`fit_stage_line`: one fixed part per call, as `LayerCost.fixed_s` prices F and
B alike, and a part per row each) and the stage's layers are priced on it, the profile giving
only their shares; with one size, each stage's measured F and B over the profile's price scales
that stage's layers (their fixed seconds with F). Either way the run's time per action and per
step outside the actions (less the tied gradient's exchange, which the plan prices apart)
replace the profile's. Where the run also measured a split backward on the same stages (1F1B's
order with each B run as I then W, "1f1b+split"; zb-h1 in calibrations before), each I and W
costs what that phase measured: the seconds each takes beyond its part of B
as a share of the stage's backward work (`ModelCosts.split_backward_share`: it grows with the
rows and the stage's layers) beside the seconds per action of the phase's longer gaps
(`ModelCosts.split_overhead_s`), and, per stage, W's share of the backward's work; F and B stay
as fitted. Where the run also measured blocks that hold more activations on the same stages
(GPipe, and zb-h1, whose later ranks hold a little more: `HeldBlock`), the slowdown of a rank's
actions with the bytes it holds is priced on a curve through every point the blocks measured
(their ranks that held more there than in 1F1B: `pipefold.plan.held_curve`), each layer against
the bytes its own rank held in the run, and the planner slows a candidate's layers whose rank
holds more than theirs did (`pipefold.plan.held_cost`). The split block of "1f1b+split" holds
what 1F1B holds, so its I and W carry the split's own seconds alone; a zb-h1 split block's later
ranks held more, and the curve's B factor there, which priced only part of their slowdown, left
the rest in the split's seconds, charged to every split stage of every candidate.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from pipefold.errors import ConfigError
from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.plan.deferred_weight import fit_deferred_most, fit_deferred_weight
from pipefold.plan.held_curve import HeldCurve, fit_held_curve, held_factor
from pipefold.plan.held_states import fit_state_slowdown
from pipefold.plan.send_fit import SendFit, SendGaps, fit_send_costs
from pipefold.plan.split_fit import SplitFit, ratio, split_prices
from pipefold.plan.stage_line import StageLine, fit_stage_line, priced_on_line, scaled_to_run
from pipefold.plan.stages import StageLayout, stage_arrays, stage_cost_model
from pipefold.simulate import CostModel, Link

__all__ = ["HeldBlock", "RunCalibration", "at_run_prices", "first_stage_backward",
           "fixed_seconds", "measured_row_scales", "update_time", "with_fixed_costs"]


def fixed_seconds(at_rows: LayerCost, rows: int, at_other: LayerCost, other_rows: int) -> float:
    """One layer's seconds per call that do not scale with rows: the mean of the F and B
    intercepts of the lines through the two measurements, kept within [0, the smaller of F and B
    at `rows`] (a negative intercept is measurement noise; a fixed part larger than an action
    would leave it a negative share per row)."""
    if rows == other_rows:
        raise ConfigError(f"rows = other_rows = {rows}; measure the layers at two different row counts")
    intercepts = []
    for here, there in ((at_rows.forward_s, at_other.forward_s), (at_rows.backward_s, at_other.backward_s)):
        slope = (there - here) / (other_rows - rows)
        intercepts.append(here - slope * rows)
    ceiling = min(at_rows.forward_s, at_rows.backward_s) if at_rows.backward_s > 0 else 0.0
    return min(max(sum(intercepts) / len(intercepts), 0.0), ceiling)


def with_fixed_costs(costs: ModelCosts, other: ModelCosts) -> ModelCosts:
    """`costs` (measured at its `reference_rows`) with each layer's fixed seconds per call, fitted
    against `other`, the same layers measured at other rows: the fixed part moves from
    `forward_s` and `backward_s` (and W's share of the backward) into `fixed_s`."""
    if other.num_layers != costs.num_layers:
        raise ConfigError(
            f"the two measurements have {costs.num_layers} and {other.num_layers} layers; measure the same "
            "model at both row counts"
        )
    layers = []
    for layer, again in zip(costs.layers, other.layers, strict=True):
        fixed = fixed_seconds(layer, costs.reference_rows, again, other.reference_rows)
        backward = layer.backward_s - fixed if layer.backward_s > 0 else 0.0
        weight = layer.weight_grad_s
        if weight is not None and layer.backward_s > 0:
            weight *= backward / layer.backward_s  # W keeps its share of what scales with rows
        layers.append(replace(layer, forward_s=layer.forward_s - fixed, backward_s=backward,
                              weight_grad_s=weight, fixed_s=layer.fixed_s + fixed))
    rows = f"{other.reference_rows} row{'s' if other.reference_rows > 1 else ''}"
    source = f"{costs.source}; fixed cost per call fitted against {rows}"
    return replace(costs, layers=tuple(layers), source=source)


def update_time(costs: ModelCosts, weight_bytes_per_rank: Sequence[int]) -> float:
    """Seconds of the step outside the pipeline's actions: the optimizer update (step, zero_grad,
    the gradient norm) of the rank holding the most parameter bytes, which the others wait for
    at the next step's first exchange."""
    largest = max(weight_bytes_per_rank, default=0)
    return costs.update_s_per_parameter_byte * largest


def first_stage_backward(model: CostModel, costs: ModelCosts, bounds: Sequence[int]) -> CostModel:
    """`model` (the stage costs of the partition `bounds`) with the first stage's I moved into its
    W where the model input takes no gradient (`costs.input_requires_grad` false: token ids).
    Its I keeps the layers' fixed seconds per call and the split's own seconds (and a recomputed
    stage's forward, which the runtime reruns there); B is unchanged."""
    if costs.input_requires_grad or not bounds or bounds[0] != 0 or model.num_stages == 0:
        return model
    own = sum(layer.fixed_s for layer in costs.layers[bounds[0]:bounds[1]])
    # b = fixed + X and w = fixed + split + share X + W, with X = own + I + W the stage's backward
    # work and i = fixed + own + split + share X + I (a recomputed stage adds its forward to all
    # three), so b - w - own + split + share X is the stage's I work, and 2b - i - w + 2 split =
    # (1 - 2 share) X, whatever the rows, speeds and recompute were.
    share = costs.split_backward_share
    work = ((2 * model.b[0] - model.i[0] - model.w[0] + 2 * costs.split_overhead_s) / (1 - 2 * share)
            if share else 0.0)
    moved = max(model.b[0] - model.w[0] - own + costs.split_overhead_s + share * work, 0.0)
    moved = min(moved, model.i[0])
    if moved == 0.0:
        return model
    i = (model.i[0] - moved, *model.i[1:])
    w = (model.w[0] + moved, *model.w[1:])
    return replace(model, i=i, w=w)


@dataclass(frozen=True)
class RunCalibration:
    """How a run's measured stage costs compared with the profile's price of the same stages, and
    the lines fitted through them where the run measured several micro-batch sizes."""

    bounds: tuple[int, ...]
    """The run's partition: stage s held layers [bounds[s], bounds[s + 1])."""
    rows: int
    """Samples per micro-batch of the run (its first micro-batch size, `pipefold train`'s default)."""
    forward_scale: tuple[float, ...]
    """Per stage, the run's F over the profile's at `rows`."""
    backward_scale: tuple[float, ...]
    """Per stage, the run's B over the profile's at `rows`."""
    action_overhead_s: float
    """The run's seconds between two compute actions of a rank (the profile's one-rank figure before)."""
    step_overhead_s: float
    """The run's seconds per step outside the schedule's actions (exchanges, norm, optimizer update)."""
    message_latency_s: float = 0.0
    """The run's measured seconds per message between ranks (its `CostModel.link` latency)."""
    measured_rows: tuple[int, ...] = ()
    """Every micro-batch size the run measured, `rows` first; one: the profile's growth with rows kept."""
    fixed_s: tuple[float, ...] = ()
    """Per stage, the fitted seconds per F and per B that do not grow with rows (with several sizes)."""
    forward_s_per_row: tuple[float, ...] = ()
    """Per stage, the fitted F seconds per row."""
    backward_s_per_row: tuple[float, ...] = ()
    """Per stage, the fitted B seconds per row."""
    fit_error: float = 0.0
    """The fit's largest relative miss of a measured F or B (0 with one size: reproduced exactly)."""
    tied_exchange_s: float = 0.0
    """The tied gradient's exchange priced for the run, left out of the update's seconds (the plan
    adds it apart, `pipefold.plan.evaluate.tied_exchange_time`)."""
    split_overhead_s: float = 0.0
    """Seconds each I and each W took beyond its part of the stage's B, where the run measured a
    split backward too, that do not grow with its work (`ModelCosts.split_overhead_s`: the split
    phase's longer gaps between actions); 0 otherwise."""
    split_backward_share: float = 0.0
    """The share of a stage's backward work each I and W took beyond its part of B
    (`ModelCosts.split_backward_share`); 0 where no split phase ran."""
    split_share_block: float = 0.0
    """The split block's own fit of that share, before pooling with the profile's."""
    split_share_profile: float | None = None
    """The one-process profile's estimate of that share (`pipefold.plan.split_fit.profile_split_share`);
    None: none given (the share is the block's)."""
    weight_share: tuple[float, ...] = ()
    """Per stage, the W share of the backward's work the split phase measured (empty: none run;
    a first stage fed token ids, whose I has no work, the other stages' mean)."""
    split_action_overhead_s: float = 0.0
    """The split phase's measured seconds between two compute actions of a rank."""
    held_bytes: tuple[int, ...] = ()
    """Per rank, the activation bytes the run held (the planner's memory model); empty without a
    held block."""
    held_block_bytes: tuple[int, ...] = ()
    """Per rank, the activation bytes the held block held (the planner's memory model)."""
    held_split_bytes: tuple[int, ...] = ()
    """Per rank, the activation bytes the split block held (the planner's memory model); empty
    where it gave no points."""
    held_curve: tuple[tuple[float, float, float], ...] = ()
    """The fitted slowdown per byte held beyond a layer's own rank's (`ModelCosts.held_curve`)."""
    split_drift: float | None = None
    """The host's drift between the 1F1B and split blocks, the 1F1B block's F over the split
    block's on the stages that ran 1F1B's actions at 1F1B's bytes there (`_block_drift`); None:
    taken per stage."""
    held_curve_block_bytes: tuple[int, ...] = ()
    """Per rank, the activation bytes the curve block (zb-h1) held (the planner's memory model);
    empty where the run had none."""
    curve_drift: float | None = None
    """The host's drift between the 1F1B and curve blocks (`_block_drift`); None: no curve block."""
    held_state_forward: float = 0.0
    """`s(1)`, the extra fraction of an F's time with one I state held, fitted on the curve block
    (`ModelCosts.held_state_forward`); 0: not fitted."""
    deferred_weight_grad: float = 0.0
    """The extra fraction of a W's time away from its own I, fitted on the curve block's W against
    the split block's (`ModelCosts.deferred_weight_grad`); 0: not fitted."""
    deferred_weight_most_s: float = 0.0
    """The most seconds a deferred W costs beyond its time right after its I, fitted on the second
    curve block (`ModelCosts.deferred_weight_most_s`); 0: no cap."""
    split_schedule: str = ""
    """The split block's order ("1f1b+split"; "zb-h1" before), as its run named it; empty: none run."""
    row_scales: tuple[tuple[int, float, float], ...] = ()
    """Per measured size (rows, F, B), the measured stage times over the fitted line's
    (`ModelCosts.row_scales`); empty with one size."""
    send_overhead_s: float = 0.0
    """The fixed seconds a send occupied its sender (`ModelCosts.send_overhead_s`); 0: not fitted."""
    send_s_per_byte: float = 0.0
    """Its seconds per message byte (`ModelCosts.send_s_per_byte`)."""
    mean_gap_s: float = 0.0
    """The run's mean gap over every action, sends included (what `action_overhead_s` was before
    the send was priced apart); 0: the send not fitted (`action_overhead_s` is that mean)."""
    send_points: tuple[tuple[int, float, int], ...] = ()
    """Per size, (message bytes, the gap after a send less the others, gaps after a send)."""


@dataclass(frozen=True)
class HeldBlock:
    """A block of the calibration run that holds more activations on the run's own stages and
    placement (GPipe beside 1F1B), and what each held per rank in the planner's memory model."""

    measured: CostModel
    """The block's measured stage costs, at the run's first size."""
    run_bytes: tuple[int, ...]
    """Per rank, the activation peak of the run's own family (1F1B)."""
    block_bytes: tuple[int, ...]
    """Per rank, the activation peak of the block's family."""
    split_bytes: tuple[int, ...] = ()
    """Per rank, the activation peak of the run's split block's order, where it ran one: "1f1b+split"
    holds 1F1B's bytes (its drift from its unsplit stages: `_block_drift`); a zb-h1 split block
    (calibrations before the curve block) held more on its later ranks, which give the curve
    points at small excesses. Empty: no points from it, the drift per stage."""
    curve: CostModel | None = None
    """The curve block's measured stage costs (zb-h1 on the run's stages at its first size), whose
    ranks that held more than in 1F1B give the curve its points at small excesses (F only: its I
    and W carry the split's own seconds); None: none run."""
    curve_bytes: tuple[int, ...] = ()
    """Per rank, the activation peak of the curve block's family; given with `curve`."""
    curve_state_weights: tuple[float, ...] = ()
    """Per stage, the mean `s(n) / s(1)` over the curve block's F of the I states their rank held
    (`pipefold.plan.held_states.stage_state_weights` of its order). Given: its F ratios fit the
    I-state term (`ModelCosts.held_state_forward`) and the held curve takes GPipe's points alone;
    empty (the callers before the term): its ranks that held more are the curve's points."""
    curve_deferred_shares: tuple[float, ...] = ()
    """Per stage, the share of the curve block's W deferred from their own I (an F, B or other I
    between: `pipefold.plan.deferred_weight.stage_deferred_shares` of its order). Given, with a split
    block: its W over the split block's fit `ModelCosts.deferred_weight_grad`; empty: not fitted."""
    curve_rows: CostModel | None = None
    """A second curve block's measured stage costs (zb-h1 on the run's stages at `curve_rows_at`
    rows, one of the run's other sizes): its W against the split block's, scaled by the stage's B
    between the sizes, fits `ModelCosts.deferred_weight_most_s`; None: none run."""
    curve_rows_at: int = 0
    """Rows per micro-batch of `curve_rows` (a size the run measured 1F1B at too)."""
    run_rows_bytes: tuple[int, ...] = ()
    """Per rank, 1F1B's activation peak at `curve_rows_at` rows; given with `curve_rows`."""
    curve_rows_bytes: tuple[int, ...] = ()
    """Per rank, the second curve block's activation peak; given with `curve_rows`."""
    curve_rows_deferred_shares: tuple[float, ...] = ()
    """Per stage, the share of the second curve block's W deferred from their own I; given with
    `curve_rows`."""


def at_run_prices(
    costs: ModelCosts, run: CostModel, bounds: Sequence[int], rows: int,
    others: Sequence[tuple[CostModel, int]] = (), placement: Sequence[int] | None = None,
    split: CostModel | None = None, split_stages: Collection[int] | None = None,
    held: HeldBlock | None = None, layer_split: Sequence[tuple[float, float, float]] | None = None,
    send_gaps: Sequence[SendGaps] = (),
) -> tuple[ModelCosts, RunCalibration]:
    """`costs` priced as `run` (a `pipefold train` run's measured `CostModel`, one stage per rank
    unless `placement` says otherwise, of the partition `bounds` at `rows` per micro-batch)
    measured them.

    With `others` (the same run's stages measured at other rows per micro-batch), each stage's F
    and B are fitted as a line over rows (`fit_stage_line`: one fixed part shared by F and B,
    and a part per row each) and the stage's layers take that line: their fixed seconds share
    the fixed part, their F and B the parts per row, so any partition and micro-batch size is
    priced by how the run's time grew with rows. With one size, every layer of stage s gets
    that stage's scales of F and B, and the profile's growth with rows is kept.

    With `split` (the same run's stages measured at `rows` under a split-backward family of the
    same partition and placement, zb-h1), each I and W is priced as that phase measured it
    (`pipefold.plan.split_fit.split_prices`): the split's seconds beyond B per action
    (`split_overhead_s`) and, per stage, W's share of the backward's work; F and B stay as fitted.
    With `layer_split` (the one-process profile's (I, W, B) seconds per layer), the split's share is
    the block's pooled
    with the profile's estimate of it (`pipefold.plan.split_fit.pooled_split_share`).
    `split_stages`: the stages
    whose I and W that phase ran apart (None: all; the runtime runs a pair that nothing separates
    on a stage no other rank waits for as one B, `RuntimeOptions.fuse_backward`); the others take
    what those measured.

    With `held` (the same run's GPipe block, its zb-h1 curve block, and the bytes each block
    held per rank), the held curve (`ModelCosts.held_curve`) is fitted through GPipe's points
    and every other block's ranks that held more than in 1F1B (the curve block's, and a zb-h1
    split block's; each block's load taken out by `_block_drift`); each layer's reference is the
    bytes its rank held in the run (`held_reference_layer_bytes`), and the split block's I and W
    are divided by the curve's B factor at their rank's bytes (1 for "1f1b+split", which holds
    1F1B's), so that slowdown is priced once, by the curve. With the curve block's deferred W
    shares (`HeldBlock.curve_deferred_shares`) and a split block, its W over the split block's
    fits `ModelCosts.deferred_weight_grad` (`_deferred_slowdown`).

    The run's time per action becomes `action_overhead_s`; its time per step outside the
    actions, less the tied gradient's exchange (priced apart by the plan), over the largest
    stage's parameter bytes, `update_s_per_parameter_byte`. With `send_gaps` (per measured size,
    `run`'s first, the gaps after an action whose output went to another rank and after the
    others), the time per action is the latter's mean and a send's occupancy is priced apart
    (`ModelCosts.send_overhead_s`, `send_s_per_byte`: `pipefold.plan.send_fit.fit_send_costs`,
    over the bytes of each size's messages across ranks)."""
    layout = StageLayout(tuple(bounds), rows)
    points = [(run, rows), *others]
    if split is not None and split.num_stages != layout.num_stages:
        raise ConfigError(f"the split phase measured {split.num_stages} stages, the run {layout.num_stages}; "
                          "measure both on the run's own partition")
    for measured, _ in points:
        if measured.num_stages != layout.num_stages or layout.bounds[0] != 0 or (
                layout.bounds[-1] != costs.num_layers):
            raise ConfigError(
                f"the run measured {measured.num_stages} stages, the partition {tuple(bounds)} has "
                f"{layout.num_stages} over {costs.num_layers} layers; calibrate with the run's own partition "
                "of every layer"
            )
    planned = stage_cost_model(costs, layout, (), Link())
    forward_scale = tuple(planned.f[s] and run.f[s] / planned.f[s] for s in range(layout.num_stages))
    backward_scale = tuple(planned.b[s] and run.b[s] / planned.b[s] for s in range(layout.num_stages))
    measured_rows = tuple(dict.fromkeys(r for _, r in points))
    fits: list[StageLine] = []
    if len(measured_rows) > 1:
        layers = list(costs.layers)
        for stage in range(layout.num_stages):
            start, stop = layout.bounds[stage], layout.bounds[stage + 1]
            shared = costs.overhead_s * (stop - start)  # per layer and action, one for the whole model: kept
            line = fit_stage_line([(r, m.f[stage] - shared, m.b[stage] - shared) for m, r in points])
            fits.append(line)
            layers[start:stop] = priced_on_line(layers[start:stop], line, costs.reference_rows)
    else:
        layers = scaled_to_run(costs, run, layout)
    latency = statistics.fmean(m.link.latency for m, _ in points)
    # The run's F already holds the once-a-step casts of a 16-bit run (spread over its first
    # forwards), so the calibrated costs price none apart.
    priced = replace(costs, layers=tuple(layers), cast_s_per_parameter_byte=0.0,
                     action_overhead_s=statistics.fmean(m.action_overhead for m, _ in points))
    if fits:
        priced = replace(priced, row_scales=measured_row_scales(priced, points, layout.bounds))
    on = tuple(range(layout.num_stages)) if placement is None else tuple(placement)
    send = _send_fit(costs, layout.bounds, on, points, send_gaps)
    if send is not None:
        priced = replace(priced, action_overhead_s=send.action_overhead_s,
                         send_overhead_s=send.send_overhead_s, send_s_per_byte=send.send_s_per_byte)
    drift: float | None = None
    held_curve: HeldCurve = ()
    split_backward = [1.0] * layout.num_stages  # per stage, the split block's held B factor
    split_on = frozenset(range(layout.num_stages) if split_stages is None else split_stages)
    curve_drift: float | None = None
    state_forward = 0.0
    if held is not None:
        _check_held(run, held, on)
        if split is not None and held.split_bytes:
            drift = _block_drift(run, split, held.run_bytes, held.split_bytes, on, split_on)
        if held.curve is not None:
            curve_drift = _block_drift(run, held.curve, held.run_bytes, held.curve_bytes, on, split_on)
        states = bool(held.curve_state_weights)
        # With the I states counted, the curve block's slowdown is theirs, not its bytes': the
        # curve keeps GPipe's points (which hold no I state) and the block fits the state term.
        held_curve = _held_curve(run, replace(held, curve=None) if states else held, on, split, drift,
                                 curve_drift)
        if states:
            state_forward = _state_slowdown(run, held, on, held_curve, curve_drift)
        # Each layer's measured time is its time at the bytes its own rank held in the run.
        references = tuple(float(held.run_bytes[on[stage]]) for stage, (start, stop)
                           in enumerate(zip(layout.bounds, layout.bounds[1:], strict=False))
                           for _ in range(start, stop))
        priced = replace(priced, held_curve=held_curve, held_reference_layer_bytes=references,
                         held_reference_bytes=float(max(held.run_bytes)), held_state_forward=state_forward)
        if held.split_bytes:
            split_backward = [held_factor(held_curve, held.split_bytes[rank] - held.run_bytes[rank])[1]
                              for rank in on]
    split_fit = SplitFit()
    deferred = 0.0
    if split is not None:
        priced, split_fit = split_prices(priced, run, split, layout, split_on, drift, split_backward,
                                         layer_split)
        if held is not None and held.curve is not None and held.curve_deferred_shares:
            deferred = _deferred_slowdown(run, split, held, on, held_curve, drift, curve_drift, split_on,
                                          split_backward)
            priced = replace(priced, deferred_weight_grad=deferred)
            if held.curve_rows is not None and deferred > 0:
                most = _deferred_most(costs, layout, run, others, split, held, on, held_curve, drift,
                                      split_on, split_backward, deferred)
                priced = replace(priced, deferred_weight_most_s=most)
    step_overhead = statistics.fmean(m.step_overhead for m, _ in points)
    # The run's time outside the actions holds the tied gradient's exchange; the plan prices it apart.
    tied = stage_cost_model(priced, layout, (), Link(latency=latency)).tied_exchange_time(
        on, costs.gradient_bytes_per_parameter_byte)
    largest = max(sum(layer.parameter_bytes for layer in costs.layers[start:stop])
                  for start, stop in zip(layout.bounds, layout.bounds[1:], strict=False))
    update = step_overhead - tied
    per_byte = update / largest if largest and update > 0 else costs.update_s_per_parameter_byte
    calibration = RunCalibration(
        bounds=layout.bounds, rows=rows, forward_scale=forward_scale, backward_scale=backward_scale,
        action_overhead_s=priced.action_overhead_s, step_overhead_s=step_overhead, message_latency_s=latency,
        measured_rows=measured_rows, fixed_s=tuple(line.fixed_s for line in fits),
        forward_s_per_row=tuple(line.forward_s_per_row for line in fits),
        backward_s_per_row=tuple(line.backward_s_per_row for line in fits),
        fit_error=max((line.error for line in fits), default=0.0), tied_exchange_s=tied,
        split_overhead_s=priced.split_overhead_s, split_backward_share=priced.split_backward_share,
        weight_share=split_fit.weight_share, split_share_block=split_fit.block_share,
        split_share_profile=split_fit.profile_share,
        split_action_overhead_s=split_fit.action_overhead_s,
        held_bytes=() if held is None else held.run_bytes,
        held_block_bytes=() if held is None else held.block_bytes,
        held_split_bytes=() if held is None else held.split_bytes, held_curve=held_curve,
        split_drift=drift, row_scales=priced.row_scales,
        held_curve_block_bytes=() if held is None else held.curve_bytes, curve_drift=curve_drift,
        held_state_forward=state_forward, deferred_weight_grad=deferred,
        deferred_weight_most_s=priced.deferred_weight_most_s,
        send_overhead_s=priced.send_overhead_s, send_s_per_byte=priced.send_s_per_byte,
        mean_gap_s=0.0 if send is None else statistics.fmean(m.action_overhead for m, _ in points),
        send_points=() if send is None else send.points,
    )
    return replace(priced, update_s_per_parameter_byte=per_byte), calibration


def _send_fit(costs: ModelCosts, bounds: Sequence[int], placement: Sequence[int],
              points: Sequence[tuple[CostModel, int]], send_gaps: Sequence[SendGaps]) -> SendFit | None:
    """`fit_send_costs` over the measured sizes, each with the mean bytes of the messages its stages
    sent across ranks (`stage_cost_model`'s, as the planner prices them); None without gaps."""
    if not send_gaps:
        return None
    if len(send_gaps) != len(points):
        raise ConfigError(f"{len(send_gaps)} send gaps for {len(points)} measured sizes; give one per size, "
                          "the run's first")
    crossing = [boundary for boundary in range(len(bounds) - 2)
                if placement[boundary] != placement[boundary + 1]]
    if not crossing:
        return None
    blocks = []
    for gaps, (_, rows) in zip(send_gaps, points, strict=True):
        sizes = stage_cost_model(costs, StageLayout(tuple(bounds), rows), (), Link()).message_bytes
        blocks.append((gaps, round(statistics.fmean(sizes[boundary] for boundary in crossing))))
    return fit_send_costs(blocks)


def measured_row_scales(costs: ModelCosts, points: Sequence[tuple[CostModel, int]], bounds: Sequence[int]
                        ) -> tuple[tuple[int, float, float], ...]:
    """Per measured micro-batch size (rows, its stage costs on the partition `bounds`), the mean
    over the stages of the measured F and B over `costs`' (priced on the fitted lines, without row
    scales; both less the runtime's seconds per layer, `overhead_s`, which are not scaled):
    `ModelCosts.row_scales`, so the planner's price passes through every measured size and
    interpolates between them (`pipefold.plan.row_scales`). One scale per size, not per stage:
    a candidate's stages are not the run's."""
    unscaled = replace(costs, row_scales=())
    # The runtime's seconds per layer and action (one figure for the whole model) are not scaled.
    shared = [costs.overhead_s * (stop - start) for start, stop in zip(bounds, bounds[1:], strict=False)]
    scales = []
    for measured, rows in sorted(points, key=lambda point: point[1]):
        line = stage_arrays(unscaled, StageLayout(tuple(bounds), rows), ())
        forward = [ratio(measured.f[stage] - shared[stage], float(line.f[stage]) - shared[stage])
                   for stage in range(measured.num_stages)]
        backward = [ratio(measured.b[stage] - shared[stage], float(line.b[stage]) - shared[stage])
                    for stage in range(measured.num_stages)]
        scales.append((rows, statistics.fmean(forward), statistics.fmean(backward)))
    return tuple(scales)


def _check_held(run: CostModel, held: HeldBlock, placement: Sequence[int]) -> None:
    """Refuse a held block (or curve block) that does not match the run's stages and ranks."""
    for name, block in (("held", held.measured), ("curve", held.curve)):
        if block is not None and block.num_stages != run.num_stages:
            raise ConfigError(f"the {name} block measured {block.num_stages} stages, the run "
                              f"{run.num_stages}; measure both on the run's own partition")
    num_ranks = max(placement) + 1
    if len(held.run_bytes) != num_ranks or len(held.block_bytes) != num_ranks or (
            held.split_bytes and len(held.split_bytes) != num_ranks):
        raise ConfigError(f"held block bytes for {len(held.run_bytes)} and {len(held.block_bytes)} ranks"
                          f"{f' (split block {len(held.split_bytes)})' if held.split_bytes else ''}, "
                          f"the run has {num_ranks}; give one activation peak per rank")
    if held.curve is not None and len(held.curve_bytes) != num_ranks:
        raise ConfigError(f"HeldBlock.curve_bytes has {len(held.curve_bytes)} peaks, the run {num_ranks} "
                          "ranks; give the curve block's activation peak per rank with its costs")


def _block_drift(run: CostModel, block: CostModel, run_bytes: Sequence[int], block_bytes: Sequence[int],
                 placement: Sequence[int], split_stages: Collection[int] = ()) -> float:
    """The host's drift between the 1F1B block and another block of the run (the split or curve
    block): the mean of the 1F1B block's seconds over the block's on the stages that ran 1F1B's
    own actions there, at no more bytes (the same actions at the same size and bytes: what moved
    is the host's load). Those are the stages whose rank held no more, and of them the ones
    outside `split_stages` where any is: a stage that runs I and W apart runs each F after a W,
    not after a B, which is slower on this host whatever the load (an F after an I or W ran ~20%
    above one after a B), so it would read as drift and be divided out of the split's I and W.
    On a stage outside `split_stages` its F and B together (both 1F1B's own actions there: twice
    the actions and three times the seconds of its F alone, so the sampling noise is less; over
    33 stored calibrations the curve block's `s(1)` then ranged 0-0.20 against 0-0.26 with F
    alone, BENCHMARKS.md, "Does W cost more away from its own I"); on a split stage (no stage
    outside) its F alone. 1 where every rank held more (nothing separates the load from the
    bytes then: the blocks alternate in rounds, so the load meets both alike, as GPipe's points
    assume). Not per stage: on a rank that holds more the F ratio is the held slowdown too, which
    a per-stage drift would divide out of its I and W (zb-h2's I and W were priced 0.86 of their
    runs so)."""
    steady = [stage for stage, rank in enumerate(placement) if block_bytes[rank] <= run_bytes[rank]]
    unsplit = [stage for stage in steady if stage not in split_stages]
    if unsplit:
        return statistics.fmean(ratio(run.f[stage] + run.b[stage], block.f[stage] + block.b[stage])
                                for stage in unsplit)
    return statistics.fmean(ratio(run.f[stage], block.f[stage]) for stage in steady) if steady else 1.0


def _state_slowdown(run: CostModel, held: HeldBlock, placement: Sequence[int], curve: HeldCurve,
                    curve_drift: float | None) -> float:
    """`s(1)` (`fit_state_slowdown`) from the curve block: per stage, its F over the run's, the
    host's drift (`curve_drift`, from the ranks that held no more) and the bytes curve's F factor
    at what its rank held beyond the run taken out, against the I states its rank held at its F."""
    if held.curve is None or len(held.curve_state_weights) != held.curve.num_stages:
        stages = 0 if held.curve is None else held.curve.num_stages
        raise ConfigError(f"HeldBlock.curve_state_weights has {len(held.curve_state_weights)} entries for "
                          f"{stages} curve-block stages; give one per stage with the curve block "
                          "(stage_state_weights of its order)")
    scale = 1.0 if curve_drift is None else curve_drift
    ratios = [ratio(held.curve.f[stage] * scale, run.f[stage])
              / held_factor(curve, held.curve_bytes[rank] - held.run_bytes[rank])[0]
              for stage, rank in enumerate(placement)]
    return fit_state_slowdown(ratios, held.curve_state_weights)


def _deferred_slowdown(run: CostModel, split: CostModel, held: HeldBlock, placement: Sequence[int],
                       curve: HeldCurve, drift: float | None, curve_drift: float | None,
                       split_stages: Collection[int], split_backward: Sequence[float]) -> float:
    """`ModelCosts.deferred_weight_grad` (`fit_deferred_weight`) from the curve block's W against
    the split block's, on the stages whose I and W both ran apart: each block's W at the 1F1B
    block's level (`curve_drift`; `drift`, else per stage the 1F1B block's F over the split
    block's, as `split_prices` takes it) and its held B factor at its rank's bytes taken out
    (`split_backward` for the split block; the curve's at the curve block's bytes), against the
    share of the curve block's W on that stage deferred from their own I."""
    shares = held.curve_deferred_shares
    if held.curve is None or len(shares) != held.curve.num_stages:
        stages = 0 if held.curve is None else held.curve.num_stages
        raise ConfigError(f"HeldBlock.curve_deferred_shares has {len(shares)} entries for {stages} "
                          "curve-block stages; give one per stage with the curve block "
                          "(stage_deferred_shares of its order)")
    curve_scale = 1.0 if curve_drift is None else curve_drift
    ratios, weights = [], []
    for stage, rank in enumerate(placement):
        if stage not in split_stages or split.w[stage] <= 0 or held.curve.w[stage] <= 0:
            continue
        split_scale = ratio(run.f[stage], split.f[stage]) if drift is None else drift
        split_w = split.w[stage] * split_scale / split_backward[stage]
        curve_w = (held.curve.w[stage] * curve_scale
                   / held_factor(curve, held.curve_bytes[rank] - held.run_bytes[rank])[1])
        ratios.append(curve_w / split_w)
        weights.append(shares[stage])
    return fit_deferred_weight(ratios, weights)


def _deferred_most(costs: ModelCosts, layout: StageLayout, run: CostModel,
                   others: Sequence[tuple[CostModel, int]], split: CostModel, held: HeldBlock,
                   placement: Sequence[int], curve: HeldCurve, drift: float | None,
                   split_stages: Collection[int], split_backward: Sequence[float], deferred: float) -> float:
    """`ModelCosts.deferred_weight_most_s` (`fit_deferred_most`) from the second curve block: per
    stage whose I and W ran apart, its W (the host's drift from the 1F1B block at its size and the
    curve's B factor at its rank's bytes taken out) over the split block's W at the first size (as
    `_deferred_slowdown` takes it), scaled to the second size by the stage's B there over its B at
    the first (the runtime's seconds per layer and action kept), against the share of its W there
    deferred from their own I."""
    block = held.curve_rows
    second = next((measured for measured, rows in others if rows == held.curve_rows_at), None)
    if block is None or second is None:
        raise ConfigError(f"the second curve block ran at {held.curve_rows_at} rows, a size the run did not "
                          "measure 1F1B at; run it at one of the run's sizes")
    shares = held.curve_rows_deferred_shares
    num_ranks = max(placement) + 1
    if (block.num_stages != run.num_stages or len(shares) != block.num_stages
            or len(held.run_rows_bytes) != num_ranks or len(held.curve_rows_bytes) != num_ranks):
        raise ConfigError(f"the second curve block: {block.num_stages} stages, {len(shares)} deferred "
                          f"shares, {len(held.run_rows_bytes)} and {len(held.curve_rows_bytes)} activation "
                          f"peaks for a run of {run.num_stages} stages on {num_ranks} ranks; give one per "
                          "stage and rank")
    load = _block_drift(second, block, held.run_rows_bytes, held.curve_rows_bytes, placement, split_stages)
    first_w, ratios, kept, weight_s = [], [], [], []
    for stage, rank in enumerate(placement):
        if stage not in split_stages or split.w[stage] <= 0 or block.w[stage] <= 0:
            continue
        shared = costs.overhead_s * (layout.bounds[stage + 1] - layout.bounds[stage])
        split_scale = ratio(run.f[stage], split.f[stage]) if drift is None else drift
        at_first = split.w[stage] * split_scale / split_backward[stage]
        growth = ratio(second.b[stage] - shared, run.b[stage] - shared)
        at_second = shared + max(at_first - shared, 0.0) * growth
        if at_second <= 0:
            continue
        measured = block.w[stage] * load / held_factor(curve, held.curve_rows_bytes[rank]
                                                       - held.run_rows_bytes[rank])[1]
        first_w.append(at_first)
        weight_s.append(at_second)
        ratios.append(measured / at_second)
        kept.append(shares[stage])
    return fit_deferred_most(deferred, first_w, ratios, kept, weight_s)


def _held_curve(run: CostModel, held: HeldBlock, placement: Sequence[int], split: CostModel | None,
                drift: float | None, curve_drift: float | None = None) -> HeldCurve:
    """The held curve (`fit_held_curve`) through every stage's point: the held block's F over the
    run's at the bytes its rank held beyond the run's, and the curve block's and split block's,
    each block's load taken out (`curve_drift`, `drift`), on the ranks that held more there (a
    "1f1b+split" split block holds no more: no points); B from the held block's points alone (a
    split block's I + W carries the split's own seconds)."""
    excess = [float(held.block_bytes[rank] - held.run_bytes[rank]) for rank in placement]  # per stage
    stages = range(len(placement))
    forward = [(excess[stage], ratio(held.measured.f[stage], run.f[stage])) for stage in stages]
    backward = [(excess[stage], ratio(held.measured.b[stage], run.b[stage])) for stage in stages]
    others = [(held.curve, held.curve_bytes, curve_drift), (split, held.split_bytes, drift)]
    for block, block_bytes, load in others:
        if block is None or not block_bytes:
            continue
        scale = 1.0 if load is None else load
        forward += [(float(block_bytes[rank] - held.run_bytes[rank]),
                     ratio(block.f[stage] * scale, run.f[stage]))
                    for stage, rank in enumerate(placement) if block_bytes[rank] > held.run_bytes[rank]]
    return fit_held_curve(forward, backward)
