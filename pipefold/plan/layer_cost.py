"""`LayerCost`: what one layer of a model costs, for one micro-batch of the reference rows.

Plain data, checked on construction, no torch; `pipefold.plan.costs.ModelCosts` holds one per
layer and reads and writes them as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipefold.errors import ConfigError

__all__ = ["LayerCost", "non_negative"]


def non_negative(owner: str, name: str, value: float) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{owner}.{name} = {value!r}; give a finite number >= 0")


@dataclass(frozen=True)
class LayerCost:
    """One layer, for one micro-batch of `ModelCosts.reference_rows` samples."""

    forward_s: float
    """Forward time, seconds."""
    backward_s: float
    """Full backward time (input and weight gradients), seconds."""
    activation_bytes: int
    """Bytes the forward keeps for the backward, per in-flight micro-batch."""
    output_bytes: int
    """Bytes of the layer's output: what crosses a stage boundary cut after this layer."""
    parameter_bytes: int = 0
    """Bytes of the layer's weights (a tied module counts at each occurrence: each holder stores it)."""
    cast_bytes: int = 0
    """Mixed precision: bytes of the 16-bit copies of the layer's weights that autocast holds for a
    step (its matrix products' weights and biases, not norms or embeddings; a profile measures them
    from autocast's cache: `LayerProfile.held_cast_bytes`). A tensor-parallel split divides their
    `tensor_parallel_cast_share`: each tp rank casts its own shard. 0 in every layer:
    `ModelCosts.cast_bytes_per_parameter_byte` prices them."""
    weight_grad_s: float | None = None
    """The weight-gradient part (W) of `backward_s`; None takes half of it, the I = W split of
    matrix-product layers (Qi et al., 2023)."""
    fixed_s: float = 0.0
    """Seconds per forward and per input-gradient backward (I, or B whole) that do not scale
    with rows, on top of `ModelCosts.overhead_s`: a tensor-parallel all-reduce's latency."""
    tensor_parallel_share: float = 0.0
    """The share of the layer's time and parameter bytes that a tensor-parallel split divides
    over the tp ranks (0: the layer is not split; see docs/decisions.md, "Tensor-parallel cost model")."""
    tensor_parallel_activation_share: float | None = None
    """The share of its activation bytes that the split divides; None: `tensor_parallel_share`."""
    num_tensor_parallel_allreduces: int = 0
    """All-reduces of the layer's output (`output_bytes`) the split adds to each forward, and of
    the input gradient (as large) to each backward."""
    tensor_parallel_cast_share: float | None = None
    """The share of its `cast_bytes` that the split divides; None: `tensor_parallel_share`."""
    saved_cast_bytes: int | None = None
    """The part of `cast_bytes` a forward's backward saves: its weights' copies, not its biases'
    (a bias's gradient needs no copy; `LayerProfile.cast_bytes`). Where the casts are not held for
    the step (full sharding), each micro-batch in flight keeps these. None: all of `cast_bytes`."""
    tensor_parallel_saved_cast_share: float | None = None
    """The share of its `saved_cast_bytes` that a tensor-parallel split divides; None:
    `tensor_parallel_cast_share`. The built-in GPT's block: 1, every weight it saves a copy of is
    split (the row-split biases it keeps whole are cast, not saved)."""
    no_decay_parameter_bytes: int = 0
    """The part of `parameter_bytes` in the optimizer group without weight decay (embeddings, norms,
    biases: `pipefold.job.optim.parameter_groups`): AdamW steps each group apart, so foreach's
    temporaries are the larger group's (`ModelCosts.update_group_bytes_per_parameter_byte`). 0:
    all in the decayed group (costs written before it price the whole rank, as they did)."""
    gradient_norm_bytes: int = 0
    """The most the gradient norm before the update holds at once over this layer's gradients
    (float64 copies: 8 x (n_prev + 2 n) over its tensors in order, n_prev of its first the
    previous layer's last: `pipefold.plan.update_memory.layer_norm_bytes`). A rank's norm is its
    layers' largest. 0 in every layer: `ModelCosts.gradient_norm_bytes` on every rank (costs
    written before it)."""
    sequence_parallel_activation_share: float | None = None
    """Set on the layers whose output sequence parallelism splits along the sequence (from the
    position embedding through the last block): the share of the layer's activation bytes
    that the split divides then. None: sequence parallelism leaves the layer as tensor
    parallelism does."""
    # -- The backward's temporaries (docs/decisions.md, "Planner memory model") --
    backward_temporary_bytes: int = 0
    """The most bytes the layer's backward holds at once beyond what its forward saved, per
    `ModelCosts.reference_rows` samples: the gradient handed to it, the one it hands on, a new
    weight gradient before it is added into the held one, its own temporaries (an MLP's hidden
    gradient). No saved-tensor hook sees them (`LayerProfile.backward_temporary_bytes`). A rank's
    pipeline call adds its stages' largest (`pipefold.plan.memory.RankMemory.temporary`); 0 in every
    layer: none (costs written before it price as they did)."""
    backward_temporary_fixed_bytes: int = 0
    """The part of `backward_temporary_bytes` that does not grow with the rows (a new weight
    gradient): a micro-batch of r rows holds it plus the rest times r / `reference_rows`
    (`backward_temporary_at`). Fitted by `pipefold profile` from its two row counts; 0: all of it
    scales with the rows."""

    # -- The dtype of what a recomputed stage keeps (docs/plan.md, "Memory model") --
    stage_output_bytes: int | None = None
    """The layer's output as the next layer of its stage receives it, on the model's own chain:
    not cast to the boundary's dtype (under autocast a GPT's residual stream is fp32 inside a stage,
    16-bit across a boundary: `output_bytes`). What that next layer keeps under its own checkpoint
    (`pipefold.plan.in_stage`). None: `output_bytes` (costs written before it, fp32)."""
    stage_output_bytes_from_boundary: int | None = None
    """The same where the layer's input arrived in the boundary's 16-bit dtype, as a stage's first
    layer's does: a residual block passes a 16-bit stream on in 16 bits, an embedding or a norm
    returns fp32 whatever it is handed. None: `stage_output_bytes` (the layer's output dtype does
    not follow its input's)."""

    activation_bytes_from_boundary: int | None = None
    """What the forward saves where the layer's input arrived in the boundary's 16-bit dtype (passed
    on from its stage's received input): on CPU a layer norm handed 16 bits saves them as they are,
    where from an fp32 stream it saves fp32 (CUDA's autocast saves an fp32 copy either way). None:
    `activation_bytes`."""

    @property
    def activations_from_boundary(self) -> int:
        """`activation_bytes_from_boundary`, or `activation_bytes` where not given."""
        given = self.activation_bytes_from_boundary
        return self.activation_bytes if given is None else given

    @property
    def stage_output(self) -> int:
        """`stage_output_bytes`, or `output_bytes` where not given."""
        return self.output_bytes if self.stage_output_bytes is None else self.stage_output_bytes

    @property
    def stage_output_from_boundary(self) -> int:
        """`stage_output_bytes_from_boundary`, or `stage_output` where not given."""
        given = self.stage_output_bytes_from_boundary
        return self.stage_output if given is None else given

    def backward_temporary_at(self, rows_scale: float) -> int:
        """`backward_temporary_bytes` for micro-batches of `rows_scale` x `ModelCosts.reference_rows` rows."""
        fixed = min(self.backward_temporary_fixed_bytes, self.backward_temporary_bytes)
        return fixed + round(rows_scale * (self.backward_temporary_bytes - fixed))

    def __post_init__(self) -> None:
        for name in ("forward_s", "backward_s", "activation_bytes", "output_bytes", "parameter_bytes",
                     "cast_bytes", "fixed_s", "num_tensor_parallel_allreduces", "no_decay_parameter_bytes",
                     "gradient_norm_bytes", "backward_temporary_bytes",
                     "backward_temporary_fixed_bytes"):
            non_negative("LayerCost", name, getattr(self, name))
        for name in ("tensor_parallel_share", "tensor_parallel_activation_share",
                     "tensor_parallel_cast_share", "tensor_parallel_saved_cast_share",
                     "sequence_parallel_activation_share"):
            share = getattr(self, name)
            if share is not None and not (isinstance(share, (int, float)) and 0 <= share <= 1):
                raise ConfigError(f"LayerCost.{name} = {share!r}; give a fraction in [0, 1]")
        if int(self.num_tensor_parallel_allreduces) != self.num_tensor_parallel_allreduces:
            raise ConfigError(
                f"LayerCost.num_tensor_parallel_allreduces = {self.num_tensor_parallel_allreduces!r}; "
                "give a whole number"
            )
        for name in ("activation_bytes", "output_bytes", "parameter_bytes", "cast_bytes",
                     "no_decay_parameter_bytes", "gradient_norm_bytes", "backward_temporary_bytes",
                     "backward_temporary_fixed_bytes"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ConfigError(f"LayerCost.{name} = {getattr(self, name)!r}; sizes are whole bytes")
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.no_decay_parameter_bytes > self.parameter_bytes:
            raise ConfigError(
                f"LayerCost.no_decay_parameter_bytes = {self.no_decay_parameter_bytes} exceeds "
                f"parameter_bytes = {self.parameter_bytes}; give the part of the layer's weights without "
                "weight decay (at most all)"
            )
        for name in ("stage_output_bytes", "stage_output_bytes_from_boundary",
                     "activation_bytes_from_boundary"):
            size = getattr(self, name)
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
                raise ConfigError(f"LayerCost.{name} = {size!r}; give whole bytes >= 0 (or leave it out: "
                                  "output_bytes)")
        if self.saved_cast_bytes is not None:
            saved = self.saved_cast_bytes
            if isinstance(saved, bool) or not isinstance(saved, int) or not 0 <= saved <= self.cast_bytes:
                raise ConfigError(f"LayerCost.saved_cast_bytes = {saved!r}; give whole bytes from 0 to "
                                  f"cast_bytes = {self.cast_bytes} (or leave it out: all of them)")
        if self.weight_grad_s is not None:
            non_negative("LayerCost", "weight_grad_s", self.weight_grad_s)
            if self.weight_grad_s > self.backward_s:
                raise ConfigError(
                    f"LayerCost.weight_grad_s = {self.weight_grad_s!r} exceeds backward_s = "
                    f"{self.backward_s!r}; it is the weight-gradient part of the backward, at most all of it"
                )

    @property
    def weight_s(self) -> float:
        """W time: the weight-gradient part of the backward."""
        return self.backward_s / 2 if self.weight_grad_s is None else self.weight_grad_s

    @property
    def saved_casts(self) -> int:
        """`saved_cast_bytes`, or all of `cast_bytes` where not given."""
        return self.cast_bytes if self.saved_cast_bytes is None else self.saved_cast_bytes

    @property
    def input_s(self) -> float:
        """I time: the input-gradient part of the backward."""
        return self.backward_s - self.weight_s
