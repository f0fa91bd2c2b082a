"""`ModelCosts`: what each layer of a model costs, the planner's only view of the model.

Times and sizes are for `reference_rows` samples and scale linearly with the rows of a
micro-batch; `overhead_s` is the fixed part (docs/decisions.md, "Cost scaling"). Plain
data, JSON in and out, no torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipefold.errors import ConfigError
from pipefold.plan.held_curve import check_held_curve
from pipefold.plan.in_stage import InStageBytes
from pipefold.plan.layer_cost import LayerCost, non_negative
from pipefold.plan.row_scales import check_row_scales

__all__ = ["CostSource", "LayerCost", "ModelCosts", "ProfileLike"]


class _HasNumBytes(Protocol):
    @property
    def num_bytes(self) -> int: ...


class ProfileLike(Protocol):
    """What `ModelCosts.from_profile` reads: `pipefold.runtime.LayerProfile` has these fields.

    Optional, read when present: `input_grad_s` and `weight_grad_s`, a measured I/W split
    (None or absent: no split measured).
    """

    @property
    def forward_s(self) -> float: ...
    @property
    def backward_s(self) -> float: ...
    @property
    def activation_bytes(self) -> int: ...
    @property
    def parameter_bytes(self) -> int: ...
    @property
    def output(self) -> _HasNumBytes: ...


def _measured_weight_grad_s(profile: ProfileLike) -> float | None:
    """W's part of the layer's backward by its measured I/W split; None (halves) without one.

    W's share of the measured I + W applied to B: the ratio is the layer's, the sum stays B's
    (docs/decisions.md, "Measured split").
    """
    # Read with getattr: older profile-like objects carry no split.
    input_s = getattr(profile, "input_grad_s", None)
    weight_s = getattr(profile, "weight_grad_s", None)
    if input_s is None or weight_s is None or not input_s + weight_s > 0:
        return None
    share = float(weight_s) / float(input_s + weight_s)
    return min(profile.backward_s, profile.backward_s * share)


def _held_cast_bytes(profile: ProfileLike) -> int:
    """The copies autocast's cache holds for the layer (`held_cast_bytes`, biases' included); a
    profile without it: the copies its backward saves (`cast_bytes`)."""
    held = getattr(profile, "held_cast_bytes", None)
    return int(getattr(profile, "cast_bytes", 0) if held is None else held)


_CAST_COLUMN = 7
"""`ModelCosts.span`'s column of the layers' `cast_bytes` (8: their `saved_casts`, 9: their
`no_decay_parameter_bytes`)."""

_FIELDS = (
    # The backward's temporaries and the CPU runtime's receive buffers.
    "loss_backward_bytes", "keeps_receive_buffers",
    "layers", "reference_rows", "input_bytes", "gradient_bytes_per_parameter_byte",
    "optimizer_bytes_per_parameter_byte", "overhead_s", "source", "tensor_parallel_degrees", "loss_bytes",
    "tied_layers", "action_overhead_s", "update_s_per_parameter_byte", "input_requires_grad",
    "tied_parameter_bytes", "cast_bytes_per_parameter_byte", "cast_s_per_parameter_byte",
    "split_overhead_s", "held_forward_per_byte", "held_backward_per_byte", "held_reference_bytes",
    "row_scales", "held_curve", "held_reference_layer_bytes", "held_state_forward", "split_backward_share",
    "update_bytes_per_parameter_byte", "update_tensor_bytes", "gradient_norm_bytes",
    "deferred_weight_grad", "update_group_bytes_per_parameter_byte", "deferred_weight_most_s",
    "send_overhead_s", "send_s_per_byte",
)


@dataclass(frozen=True)
class ModelCosts:
    """Per-layer costs of a model and what training adds per parameter byte (docs/decisions.md,
    "Cost scaling")."""

    layers: tuple[LayerCost, ...]
    reference_rows: int = 1
    """Samples in the micro-batch the layer costs were taken for."""
    input_bytes: int = 0
    """Bytes of the model input for `reference_rows` samples: what stage 0 keeps under recomputation."""
    gradient_bytes_per_parameter_byte: float = 1.0
    """Gradient storage per parameter byte (1: gradients in the parameters' dtype)."""
    optimizer_bytes_per_parameter_byte: float = 2.0
    """Optimizer state per parameter byte (Adam: two moments, 2; with bf16 weights and fp32 master
    copies, `precision="bf16-pure"`: the master and two fp32 moments, 6)."""
    cast_bytes_per_parameter_byte: float = 0.0
    """The 16-bit weight copies mixed precision holds for a step, per parameter byte of the whole
    model: autocast casts each matrix weight once a step and its backward keeps the copy; 0 in
    fp32 and with bf16 weights. A rank holds them once, beside its weights
    (`pipefold.plan.memory.RankMemory.casts`). Where layers carry their own (`LayerCost.cast_bytes`,
    from a profile or the FLOP estimate) each stage is priced its layers' own instead, and this
    is only their sum over the parameter bytes (`pipefold.plan.stages.stage_cost_model`)."""
    cast_s_per_parameter_byte: float = 0.0
    """Seconds autocast spends making those copies, per parameter byte (`LayerProfile.cast_s`): once
    a step, at each stage's first forward (under full sharding at every forward of the gathered
    weights: `pipefold.plan.precision_costs`)."""
    overhead_s: float = 0.0
    """Fixed seconds per layer and per compute action (F, B, I or W), independent of rows."""
    source: str = ""
    """Where the numbers come from ("measured on cuda:0", "FLOP estimate ..."), shown with the plan."""
    tensor_parallel_degrees: tuple[int, ...] = ()
    """The tensor-parallel degrees the split layers allow (the GPT: the divisors of its head
    count); empty: any. The planner searches no other."""
    loss_bytes: int = 0
    """Bytes the loss saves for its backward per `reference_rows` samples (a cross-entropy's
    log-probabilities: as large as the logits), held by the last stage per micro-batch in flight,
    recomputed or not (the loss runs outside the stage's checkpoints)."""
    # -- The backward's temporaries and the CPU receive buffers (decisions.md, "Planner memory model") --
    loss_backward_bytes: int = 0
    """The most bytes the loss's backward holds at once per `reference_rows` samples (a
    cross-entropy's gradients of the log-probabilities and of the logits: two tensors as large as
    the logits; `LayerProfile.loss_backward_bytes`): a temporary of the last stage's backward,
    priced as a layer's `LayerCost.backward_temporary_bytes`. 0: none (costs written before it)."""
    keeps_receive_buffers: bool = False
    """Whether the runtime keeps its receive buffers from step to step: one per (stage, micro-batch)
    and direction on CPU (`pipefold.runtime.receive_buffers`), none on CUDA, where every message gets
    a fresh buffer. True: a rank's pipeline call adds those it holds beyond the activations in
    flight (`pipefold.plan.memory.RankMemory.received`). Set where the costs are measured or
    estimated for a CPU."""
    tied_layers: tuple[tuple[int, ...], ...] = ()
    """Groups of layers that hold one weight (a tied embedding and head: `((0, num_layers - 1),)`),
    each holding it whole. A rank holding several of them holds the weight once
    (`pipefold.plan.stages.tied_weights`), and full sharding gathers them as one unit
    (`pipefold.schedule.shard_units`)."""
    tied_parameter_bytes: tuple[int, ...] = ()
    """Per group of `tied_layers`, the bytes of the weight its layers share, where a layer holds
    more than that weight (a Hugging Face GPT-2's suffix: the final norm beside the tied head).
    Empty: each group's smallest layer `parameter_bytes` (its layers one module, as the built-in
    GPT's tied embedding and head are)."""
    action_overhead_s: float = 0.0
    """Runtime seconds per compute action beyond its layers' own (the executor's dispatch, the
    stage's entry, the backward's entry, recording): the simulator's `CostModel.action_overhead`."""
    send_overhead_s: float = 0.0
    """Seconds a rank spends handing a message to another rank after the action that produced it,
    before its next action (beyond `action_overhead_s`): the simulator's `CostModel.send_overhead`,
    charged after an F whose next stage, or a B or I whose previous stage, is on another rank.
    Fitted by `pipefold plan --profile`'s calibration from its ranks' gaps after such actions
    against the others' (`pipefold.plan.send_fit`); 0: not priced (costs before it)."""
    send_s_per_byte: float = 0.0
    """The part of that time per byte of the message (`CostModel.send_seconds_per_byte`)."""
    split_overhead_s: float = 0.0
    """Seconds each I and each W action takes beyond its part of the B it splits (the runtime's
    second entry into the stage's backward): a split backward costs B plus twice this, per
    micro-batch and stage (measured by `pipefold plan --profile`'s calibration run). With
    `split_backward_share`, only the part that does not grow with the stage's work (the runtime's
    longer gaps between a split stage's actions)."""
    split_backward_share: float = 0.0
    """The share of a stage's backward work (its B less the runtime's seconds per layer and action,
    `overhead_s`) that each I and each W takes beyond its part of B: a split backward costs B plus
    twice this share of it, so the split's own seconds grow with the micro-batch's rows and the
    stage's layers (one process, train's default GPT: 5-7% of B at 1-16 rows, from 110 us at 1
    row to 1.2 ms at 16 on its last stage; BENCHMARKS.md, "Does the split's own cost grow with
    rows"). In [0, 0.5); 0: the split's seconds are `split_overhead_s` alone (costs before it)."""
    update_s_per_parameter_byte: float = 0.0
    """Seconds of the optimizer update (step, zero_grad, gradient norm) per parameter byte of a rank,
    outside the pipeline's actions: the step adds it for the rank holding the most
    (`pipefold.plan.calibrate.update_time`)."""
    update_bytes_per_parameter_byte: float = 0.0
    """The optimizer update's temporaries per parameter byte of a rank, live at once during the
    step (`pipefold.plan.update_memory`): bf16 weights with fp32 masters copy every gradient to
    fp32 before it (2 in bf16-pure). Costs written before `update_group_bytes_per_parameter_byte`
    also carry foreach's square roots here, priced on the whole rank (1 in fp32, 4 in bf16-pure).
    0: not priced (fp32 and autocast: no copies)."""
    update_group_bytes_per_parameter_byte: float = 0.0
    """The step's temporaries per parameter byte of the rank's larger optimizer group (decayed or
    not: `LayerCost.no_decay_parameter_bytes`): torch's foreach AdamW (its default on CUDA) makes a
    square root of each of a group's states in one list, group by group (1 in fp32, 2 in
    bf16-pure, whose state is fp32). Added to `update_bytes_per_parameter_byte`'s part. 0: none
    (the single-tensor AdamW; costs written before it)."""
    update_tensor_bytes: int = 0
    """The update's temporaries of one parameter at a time, at their largest over the model (the
    single-tensor AdamW, torch's default on CPU: two fp32 tensors of a parameter's size and one of
    the previous one's, priced on the two largest of one optimizer group, the group where that is
    most), added to the per-byte parts on every rank (an upper bound where the largest sit on
    another rank)."""
    gradient_norm_bytes: int = 0
    """The most the gradient norm before the update holds at once (float64 copies of one or two
    gradients: `pipefold.plan.update_memory.gradient_norm_bytes`), over the whole model: every
    rank's, where the layers do not carry their own (`LayerCost.gradient_norm_bytes`); it runs
    before the step, so a rank's update holds the larger of it and the step's temporaries
    (`RankMemory.update`)."""
    held_forward_per_byte: float = 0.0
    """The extra fraction of an F's time per activation byte its rank holds beyond
    `held_reference_bytes`, a straight line (what calibrations fitted before `held_curve`; a CPU
    host's actions slow with the memory a rank holds: `pipefold.plan.held_cost`). 0: not priced.
    Ignored where `held_curve` is given."""
    held_backward_per_byte: float = 0.0
    """The same for B, I and W."""
    held_reference_bytes: float = 0.0
    """The activation bytes held at calibration (the most any rank of its 1F1B run held, in the
    planner's memory model): a rank holding no more is priced as measured. Every layer's
    reference where `held_reference_layer_bytes` is empty."""
    held_curve: tuple[tuple[float, float, float], ...] = ()
    """(bytes beyond the reference, F factor, B factor) knots of the slowdown of a layer whose
    rank holds that many activation bytes beyond its reference, in increasing bytes, factors >= 1
    and non-decreasing: linear from (0, 1, 1) between them, the last one's past it
    (`pipefold.plan.held_cost.held_factor`; fitted by `pipefold plan --profile`'s calibration
    from its GPipe and zb-h1 blocks beside its 1F1B run). Empty: the slopes above, if any."""
    held_reference_layer_bytes: tuple[float, ...] = ()
    """Per layer, the activation bytes its rank held in the calibration's 1F1B run (the planner's
    memory model): its measured time is its time at those bytes. Empty: `held_reference_bytes`
    for every layer."""
    held_state_forward: float = 0.0
    """`s(1)`: the extra fraction of an F's time on a rank that holds one I state (an input-gradient
    backward whose W has not run), more states priced by `pipefold.plan.held_states.state_weight`
    (fitted by `pipefold plan --profile`'s calibration from its zb-h1 block; then the held curve
    holds GPipe's points alone). 0: not priced (costs without that block, hardware presets)."""
    deferred_weight_grad: float = 0.0
    """The extra fraction of a W's time where an F, a B or another I ran between its own I and it on
    its rank (deferred; other W between do not count): the calibration's split block runs each W
    right after its I, whose output gradients are then still in cache; a deferred W reads them
    back cold (one process, train's default GPT: 1.00-1.27x, BENCHMARKS.md, "Does W cost more
    away from its own I"). Fitted by `pipefold plan --profile`'s calibration from its zb-h1
    block's W against its split block's (`pipefold.plan.deferred_weight`). 0: not priced (costs
    without those blocks, hardware presets)."""
    deferred_weight_most_s: float = 0.0
    """The most seconds a deferred W costs beyond its time right after its own I: a stage's W
    factor is `1 + share * min(deferred_weight_grad, deferred_weight_most_s / W)`, W its seconds at
    the candidate's rows (one process: the extra stopped growing at ~1.4 ms once a stage's W
    outgrew the cache, so the fraction fell from 1.24 at 4 rows to 1.08 at 16 on the last stage;
    `pipefold.plan.deferred_weight`). Fitted by the calibration from a second zb-h1 block at twice
    its first rows. 0: no cap (costs before it, or a second block whose fraction did not fall)."""
    row_scales: tuple[tuple[int, float, float], ...] = ()
    """(rows, F scale, B scale) at each micro-batch size a calibration run measured, in increasing
    rows: its measured stage times over the fitted line's, by which a stage's F (and B, I, W) at
    those rows is multiplied, linear in rows between them (`pipefold.plan.row_scales`). Empty:
    the line alone."""
    input_requires_grad: bool = True
    """Whether the model's input takes a gradient (a float input does; token ids do not). Without
    one the first stage's backward has no input half: the runtime's I of that stage only enters
    and leaves, and its W computes the whole backward (`pipefold.plan.calibrate.first_stage_backward`)."""
    _prefix: tuple[tuple[float, ...], ...] = field(init=False, repr=False, compare=False)
    prefix_array: np.ndarray = field(init=False, repr=False, compare=False)
    """`span`'s running sums as one (kind, layers + 1) array, for sums over many stages at once."""
    in_stage: InStageBytes = field(init=False, repr=False, compare=False)
    """What each layer of a recomputed stage keeps, as running sums (`pipefold.plan.in_stage`)."""
    norm_array: np.ndarray = field(init=False, repr=False, compare=False)
    """The layers' `LayerCost.gradient_norm_bytes` and a 0 after them (int64), for a stage's
    largest at once (`pipefold.plan.stages.stage_cost_model`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ConfigError("ModelCosts.layers is empty; give one LayerCost per layer")
        tied = tuple(tuple(group) for group in self.tied_layers)
        for group in tied:
            if len(group) < 2 or len(set(group)) != len(group) or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.layers) for i in group
            ):
                raise ConfigError(
                    f"ModelCosts.tied_layers: {group!r}; give two or more distinct layer indices in "
                    f"0..{len(self.layers) - 1} per group"
                )
        object.__setattr__(self, "tied_layers", tied)
        sizes = tuple(self.tied_parameter_bytes)
        if sizes and (len(sizes) != len(tied) or any(
            isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= min(
                self.layers[i].parameter_bytes for i in group)
            for size, group in zip(sizes, tied, strict=True)
        )):
            raise ConfigError(
                f"ModelCosts.tied_parameter_bytes = {self.tied_parameter_bytes!r}; give one size per group "
                f"of tied_layers {[list(g) for g in tied]}, each > 0 and at most its layers' parameter_bytes "
                "(or leave it empty)"
            )
        object.__setattr__(self, "tied_parameter_bytes", sizes)
        if not all(isinstance(layer, LayerCost) for layer in self.layers):
            raise ConfigError("ModelCosts.layers must hold LayerCost values, one per layer")
        if isinstance(self.reference_rows, bool) or not isinstance(self.reference_rows, int) or (
            self.reference_rows < 1
        ):
            raise ConfigError(
                f"ModelCosts.reference_rows = {self.reference_rows!r}; give the samples per micro-batch "
                "the costs were taken for (an integer >= 1)"
            )
        for name in ("input_bytes", "gradient_bytes_per_parameter_byte", "optimizer_bytes_per_parameter_byte",
                     "cast_bytes_per_parameter_byte", "overhead_s", "loss_bytes", "action_overhead_s",
                     "update_s_per_parameter_byte", "cast_s_per_parameter_byte", "split_overhead_s",
                     "held_forward_per_byte", "held_backward_per_byte", "held_reference_bytes",
                     "held_state_forward", "update_bytes_per_parameter_byte", "update_tensor_bytes",
                     "gradient_norm_bytes", "deferred_weight_grad", "update_group_bytes_per_parameter_byte",
                     "deferred_weight_most_s", "send_overhead_s", "send_s_per_byte"):
            non_negative("ModelCosts", name, getattr(self, name))
        share = self.split_backward_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 0.5:
            raise ConfigError(
                f"ModelCosts.split_backward_share = {share!r}; give a number in [0, 0.5): the share of a "
                "stage's backward work each I and W takes beyond its part of B (0: none)"
            )
        if not isinstance(self.input_requires_grad, bool):
            raise ConfigError(
                f"ModelCosts.input_requires_grad = {self.input_requires_grad!r}; give true (a float model "
                "input) or false (token ids)"
            )
        object.__setattr__(self, "row_scales", check_row_scales(self.row_scales))
        object.__setattr__(self, "held_curve", check_held_curve(self.held_curve))
        references = tuple(self.held_reference_layer_bytes)
        if references and (len(references) != len(self.layers) or any(
                isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0 <= value < float("inf")
                for value in references)):
            raise ConfigError(
                f"ModelCosts.held_reference_layer_bytes = {self.held_reference_layer_bytes!r}; give one "
                f"finite number >= 0 per layer ({len(self.layers)}), the bytes its calibration rank held, "
                "or leave it empty"
            )
        object.__setattr__(self, "held_reference_layer_bytes", tuple(float(value) for value in references))
        degrees = tuple(self.tensor_parallel_degrees)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in degrees):
            raise ConfigError(
                f"ModelCosts.tensor_parallel_degrees = {self.tensor_parallel_degrees!r}; give integers >= 1 "
                "(empty: any degree)"
            )
        object.__setattr__(self, "tensor_parallel_degrees", tuple(sorted(set(degrees))))
        # What each layer of a recomputed stage keeps, in its in-stage dtype (`stage_kept_input_bytes`).
        object.__setattr__(self, "in_stage", InStageBytes.of(self.layers, self.input_bytes))
        # Prefix sums, so a stage's totals cost O(1) whatever the partition (the search asks often).
        columns = (
            [layer.forward_s for layer in self.layers],
            [layer.input_s for layer in self.layers],
            [layer.weight_s for layer in self.layers],
            [float(layer.activation_bytes) for layer in self.layers],
            [float(layer.parameter_bytes) for layer in self.layers],
            # What a checkpointed layer keeps as its stage's first (`kept_input_bytes`; a stage's
            # total, the dtype inside it included: `in_stage`).
            [float(self.kept_input_bytes(index)) for index in range(len(self.layers))],
            [layer.fixed_s for layer in self.layers],
            [float(layer.cast_bytes) for layer in self.layers],
            [float(layer.saved_casts) for layer in self.layers],
            [float(layer.no_decay_parameter_bytes) for layer in self.layers],
        )
        prefixes = []
        for column in columns:
            running = [0.0]
            for value in column:
                running.append(running[-1] + value)
            prefixes.append(tuple(running))
        object.__setattr__(self, "_prefix", tuple(prefixes))
        object.__setattr__(self, "prefix_array", np.array(prefixes, dtype=np.float64))
        object.__setattr__(self, "norm_array", np.array(
            [layer.gradient_norm_bytes for layer in self.layers] + [0], dtype=np.int64))
        non_negative("ModelCosts", "loss_backward_bytes", self.loss_backward_bytes)
        if not isinstance(self.keeps_receive_buffers, bool):
            raise ConfigError(f"ModelCosts.keeps_receive_buffers = {self.keeps_receive_buffers!r}; give true "
                              "(the runtime keeps its receive buffers between steps: CPU) or false")

    def kept_input_bytes(self, index: int) -> int:
        """What layer `index` keeps per `reference_rows` samples when it runs under its own
        checkpoint (a recomputed stage) as its stage's first layer: its input (`input_bytes` for
        the first layer, else the boundary, the previous layer's `output_bytes`), but nothing
        where its forward saves nothing (`activation_bytes` 0, e.g. a position embedding's add):
        torch's non-reentrant checkpoint holds its inputs only through the saved tensors it
        packs, so with none packed the input is freed (measured: the 2-rank tiny GPT's rank 0,
        docs/plan.md "Against the CPU allocator"). Later layers of a stage keep their input in
        its in-stage dtype: `stage_kept_input_bytes`."""
        return int(self.in_stage.first[index])

    def stage_kept_input_bytes(self, start: int, stop: int) -> list[int]:
        """Per layer of the recomputed stage [start, stop), first to last, what it keeps per
        `reference_rows` samples under its own checkpoint (`pipefold.plan.in_stage`)."""
        return [round(size) for size in self.in_stage.layer_bytes(start, stop)]

    def stage_activation_bytes(self, start: int, stop: int) -> list[int]:
        """Per layer of the stage [start, stop), first to last, what its forward saves per
        `reference_rows` samples, from the dtype its input has in the stage (`pipefold.plan.in_stage`)."""
        return [round(size) for size in self.in_stage.layer_activations(start, stop)]

    def zero_sharded(self, num_data_parallel: int) -> ModelCosts:
        """What one of `num_data_parallel` ZeRO replicas keeps and updates: its share of the
        optimizer state and of the update's temporaries per parameter byte."""
        return replace(
            self,
            optimizer_bytes_per_parameter_byte=self.optimizer_bytes_per_parameter_byte / num_data_parallel,
            update_bytes_per_parameter_byte=self.update_bytes_per_parameter_byte / num_data_parallel,
            update_group_bytes_per_parameter_byte=(
                self.update_group_bytes_per_parameter_byte / num_data_parallel),
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tied_bytes(self) -> tuple[int, ...]:
        """Per group of `tied_layers`, the bytes of the weight it shares (`tied_parameter_bytes`,
        else the group's smallest layer `parameter_bytes`)."""
        if self.tied_parameter_bytes:
            return self.tied_parameter_bytes
        return tuple(min(self.layers[i].parameter_bytes for i in group) for group in self.tied_layers)

    @property
    def tied_copies(self) -> tuple[tuple[tuple[int, ...], int], ...]:
        """Per group of `tied_layers` whose shared weight two or more of its layers cast (mixed
        precision): those layers and the bytes of that weight's 16-bit copy, half its fp32 bytes
        (`tied_bytes`: autocast casts fp32 weights only). A layer is taken to cast it where its own
        copies (`LayerCost.cast_bytes`) are at least that copy's (an embedding casts nothing)."""
        found = []
        for group, size in zip(self.tied_layers, self.tied_bytes, strict=True):
            copy = size // 2
            casting = tuple(index for index in group if copy and self.layers[index].cast_bytes >= copy)
            if len(casting) > 1:
                found.append((casting, copy))
        return tuple(found)

    @property
    def parameter_bytes(self) -> int:
        return sum(layer.parameter_bytes for layer in self.layers)

    @property
    def cast_s_per_cast_byte(self) -> float:
        """Seconds per byte of the layers' weight copies (`LayerCost.cast_bytes`): the casts' time
        (`cast_s_per_parameter_byte` over the model) spread over the copies it makes; 0 without."""
        copies = self._prefix[_CAST_COLUMN][-1]
        return self.cast_s_per_parameter_byte * self.parameter_bytes / copies if copies else 0.0

    def saved_casts_between(self, bounds: Sequence[int]) -> list[int]:
        """Per stage cut at `bounds`, its layers' `LayerCost.saved_casts`: the copies one of its
        forwards keeps for the backward where the casts are not held for the step."""
        column = self._prefix[_CAST_COLUMN + 1]
        return [round(column[stop] - column[start]) for start, stop in zip(bounds, bounds[1:], strict=False)]

    @property
    def norms_per_layer(self) -> bool:
        """Whether the layers carry their own gradient norm bytes (`LayerCost.gradient_norm_bytes`)."""
        return bool(self.norm_array.any())

    @property
    def casts_per_layer(self) -> bool:
        """Whether the layers carry their own weight copies (`LayerCost.cast_bytes`)."""
        return self._prefix[_CAST_COLUMN][-1] > 0

    @property
    def splits(self) -> bool:
        """Whether any layer has a tensor-parallel share."""
        return any(layer.tensor_parallel_share > 0 for layer in self.layers)

    def allows_tensor_parallel(self, degree: int) -> bool:
        return degree == 1 or (self.splits and (not self.tensor_parallel_degrees
                                                or degree in self.tensor_parallel_degrees))

    @property
    def state_factor(self) -> float:
        """Bytes of weights, gradients and optimizer state per parameter byte."""
        return 1.0 + self.gradient_bytes_per_parameter_byte + self.optimizer_bytes_per_parameter_byte

    def span(self, kind: int, start: int, stop: int) -> float:
        """Sum over layers [start, stop) of column `kind`: 0 F, 1 I, 2 W (seconds), 3 activation
        bytes, 4 parameter bytes, 5 input bytes (at `reference_rows`), 6 fixed seconds, 7 cast bytes,
        8 saved casts, 9 parameter bytes without weight decay."""
        prefix = self._prefix[kind]
        return prefix[stop] - prefix[start]

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_profile(
        cls,
        profiles: Sequence[ProfileLike],
        *,
        rows: int,
        input_bytes: int = 0,
        weight_grad_share: float | None = None,
        **options: Any,
    ) -> ModelCosts:
        """From `pipefold.runtime.profile(layers, sample)`; `rows` is the sample's batch size.

        Each layer's backward is split into I and W by `weight_grad_share` (the fraction
        that is W, for every layer) when given; otherwise by the layer's own measured
        split when the profile has one (`profile(..., split_backward=True)`: W's share of
        the measured I + W); otherwise in halves. B stays the measured whole backward: the
        split only apportions it (see docs/decisions.md, "Measured split").
        Duck-typed, so this module needs no torch; other keywords go to the constructor.
        """
        if weight_grad_share is not None and not 0 <= weight_grad_share <= 1:
            raise ConfigError(f"weight_grad_share = {weight_grad_share!r}; give a fraction in [0, 1]")
        def weight_grad_s(p: ProfileLike) -> float | None:
            if weight_grad_share is None:
                return _measured_weight_grad_s(p)
            return p.backward_s * weight_grad_share

        layers = tuple(
            LayerCost(
                forward_s=p.forward_s,
                backward_s=p.backward_s,
                activation_bytes=p.activation_bytes,
                output_bytes=p.output.num_bytes,
                parameter_bytes=p.parameter_bytes,
                cast_bytes=_held_cast_bytes(p),
                saved_cast_bytes=min(int(getattr(p, "cast_bytes", 0)), _held_cast_bytes(p)),
                weight_grad_s=weight_grad_s(p),
                backward_temporary_bytes=int(getattr(p, "backward_temporary_bytes", 0)),
                stage_output_bytes=getattr(p, "stage_output_bytes", None),
                stage_output_bytes_from_boundary=getattr(p, "stage_output_bytes_from_boundary", None),
                activation_bytes_from_boundary=getattr(p, "activation_bytes_from_boundary", None),
            )
            for p in profiles
        )
        options.setdefault("source", "measured profile")
        options.setdefault("loss_bytes", getattr(profiles[-1], "loss_bytes", 0) if profiles else 0)
        options.setdefault("loss_backward_bytes",
                           int(getattr(profiles[-1], "loss_backward_bytes", 0)) if profiles else 0)
        # A profile under autocast measures each layer's 16-bit weight copies (priced per stage from
        # its layers); their sum per parameter byte summarises them.
        parameters = sum(p.parameter_bytes for p in profiles)
        casts = sum(layer.cast_bytes for layer in layers)
        if casts and parameters:
            options.setdefault("cast_bytes_per_parameter_byte", casts / parameters)
            cast_s = sum(getattr(p, "cast_s", 0.0) for p in profiles)
            options.setdefault("cast_s_per_parameter_byte", cast_s / parameters)
        return cls(layers=layers, reference_rows=rows, input_bytes=input_bytes, **options)

    # -- serialization -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _FIELDS}
        data["layers"] = [asdict(layer) for layer in self.layers]
        data["tensor_parallel_degrees"] = list(self.tensor_parallel_degrees)
        data["tied_layers"] = [list(group) for group in self.tied_layers]
        data["tied_parameter_bytes"] = list(self.tied_parameter_bytes)
        data["row_scales"] = [list(entry) for entry in self.row_scales]
        data["held_curve"] = [list(entry) for entry in self.held_curve]
        data["held_reference_layer_bytes"] = list(self.held_reference_layer_bytes)
        if not self.held_state_forward:  # written only where priced: costs without it read as before
            del data["held_state_forward"]
        if not self.split_backward_share:  # the same: costs fitted before it read and write as before
            del data["split_backward_share"]
        for name in ("update_bytes_per_parameter_byte", "update_tensor_bytes", "gradient_norm_bytes",
                     "deferred_weight_grad", "update_group_bytes_per_parameter_byte",
                     "deferred_weight_most_s", "send_overhead_s", "send_s_per_byte"):
            if not getattr(self, name):  # the same: costs without these terms as before
                del data[name]
        for layer in data["layers"]:
            for name in ("no_decay_parameter_bytes", "gradient_norm_bytes", "backward_temporary_bytes",
                         "backward_temporary_fixed_bytes"):
                if not layer[name]:  # layers without these write as before
                    del layer[name]
            for name in ("stage_output_bytes", "stage_output_bytes_from_boundary",
                         "activation_bytes_from_boundary"):
                if layer[name] is None:  # the same: fp32 costs and costs before them
                    del layer[name]
        for name in ("loss_backward_bytes", "keeps_receive_buffers"):
            if not data[name]:  # costs without the backward's temporaries or a CPU's buffers, as before
                del data[name]
        return data

    @classmethod
    def from_json(cls, source: str | Path | Mapping[str, Any]) -> ModelCosts:
        """From a dict written by `to_json`, or a JSON file path. Unknown fields are refused."""
        if isinstance(source, (str, Path)):
            try:
                data: Mapping[str, Any] = json.loads(Path(source).read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ConfigError(f"cannot read model costs JSON from {str(source)!r}: {error}") from None
        else:
            data = source
        if not isinstance(data, Mapping):
            raise ConfigError("model costs JSON must be an object with a 'layers' list")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"unknown model costs field(s) {unknown}; known fields: {sorted(_FIELDS)}")
        layer_fields = {"forward_s", "backward_s", "activation_bytes", "output_bytes", "parameter_bytes",
                        "cast_bytes", "weight_grad_s", "fixed_s", "tensor_parallel_share",
                        "tensor_parallel_activation_share", "tensor_parallel_cast_share",
                        "num_tensor_parallel_allreduces", "saved_cast_bytes",
                        "tensor_parallel_saved_cast_share", "sequence_parallel_activation_share",
                        "no_decay_parameter_bytes", "gradient_norm_bytes", "backward_temporary_bytes",
                        "backward_temporary_fixed_bytes", "stage_output_bytes",
                        "stage_output_bytes_from_boundary", "activation_bytes_from_boundary"}
        layers = []
        for index, entry in enumerate(data.get("layers") or ()):
            if not isinstance(entry, Mapping):
                raise ConfigError(f"layers[{index}] must be an object with forward_s, backward_s, ...")
            extra = sorted(set(entry) - layer_fields)
            missing = sorted({"forward_s", "backward_s", "activation_bytes", "output_bytes"} - set(entry))
            if extra or missing:
                raise ConfigError(
                    f"layers[{index}]: unknown field(s) {extra}, missing field(s) {missing}; "
                    f"a layer has {sorted(layer_fields)}"
                )
            layers.append(LayerCost(**entry))
        rest = {name: data[name] for name in _FIELDS if name != "layers" and name in data}
        if "tensor_parallel_degrees" in rest:
            rest["tensor_parallel_degrees"] = tuple(rest["tensor_parallel_degrees"])
        if "tied_layers" in rest:
            rest["tied_layers"] = tuple(tuple(group) for group in rest["tied_layers"])
        if "tied_parameter_bytes" in rest:
            rest["tied_parameter_bytes"] = tuple(rest["tied_parameter_bytes"])
        if "row_scales" in rest:
            if not isinstance(rest["row_scales"], list):
                raise ConfigError(f"model costs row_scales = {rest['row_scales']!r}; give a list of "
                                  "[rows, F scale, B scale]")
            rest["row_scales"] = tuple(rest["row_scales"])
        for name in ("held_curve", "held_reference_layer_bytes"):
            if name in rest:
                if not isinstance(rest[name], list):
                    raise ConfigError(
                        f"model costs {name} = {rest[name]!r}; give a list (see ModelCosts.{name})")
                rest[name] = tuple(rest[name])
        return cls(layers=tuple(layers), **rest)


class CostSource(Protocol):
    """Costs that depend on the micro-batch rows and tp degree other than linearly: what the
    planner asks for each (rows, tp) it prices (`pipefold.plan.estimate.GptEstimate` is one).

    `base` is the model at its reference rows and tp = 1 (its layers, its tp degrees, its
    source); `at(rows, tp, tp_link, sequence_parallel)` one tp rank's costs for micro-batches of
    `rows` samples, its `reference_rows` = `rows`.
    """

    @property
    def base(self) -> ModelCosts: ...

    def at(self, rows: int, tensor_parallel: int, link: Any, sequence_parallel: bool) -> ModelCosts: ...
