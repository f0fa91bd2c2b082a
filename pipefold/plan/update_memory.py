"""What the update after a flush step allocates for a moment: the gradient norm's and AdamW's temporaries.

    fields = update_temporaries([p.numel() for p in params], value_bytes=4, foreach=True, masters=False,
                                no_decay=[id(p) in no_decay(modules) for p in params])
    costs = ModelCosts.from_profile(..., **fields)      # priced per rank: `memory.update_bytes`

`pipefold train` computes the gradient norm (`pipefold.runtime.clip`, always: it is logged), then
steps `torch.optim.AdamW` with torch's defaults (amsgrad, maximize, capturable off), one call per
parameter group (weight decay / none: `pipefold.job.optim.parameter_groups`). What each allocates
beyond the weights, gradients and state the plan already counts (torch 2.x, `torch/optim/adam.py`):

- **The gradient norm** converts each gradient to float64 and takes its absolute value
  (`grad.to(float64).abs()`: two float64 copies at once) while the previous gradient's `values` is
  still bound, then squares it (`values.pow(2)`): 8 bytes x (n_prev + 2 n) at most, for the
  consecutive tensors of n_prev and n elements that make it largest among the rank's own: each
  layer carries its figure (`layer_norm_bytes`, `LayerCost.gradient_norm_bytes`) and a rank
  holds its layers' largest, so a rank of blocks is not priced the embedding's copies (costs
  without the layers' figures: the model's, `gradient_norm_bytes`, on every rank). A layer's
  first tensor is priced after the previous layer's last, which at a rank's first layer sits on
  another rank: an upper bound by 8 bytes x that tensor (none for a GPT block, led by a norm).
- **foreach ("multi-tensor")**, torch's default when every parameter is on CUDA (or another
  device with foreach kernels): `torch._foreach_sqrt(exp_avg_sqs)` makes one tensor per
  parameter of the group, in the state's dtype, live until the call returns: the group's whole
  state size. Everything else runs in place (decoupled weight decay `_foreach_mul_`, `lerp_`,
  `mul_`/`addcmul_`, `addcdiv_`); the bias corrections are Python floats. The groups are separate
  calls, so a rank holds the larger group's list (`update_group_bytes_per_parameter_byte`, on
  the rank's larger group from its layers' `LayerCost.no_decay_parameter_bytes`): where a
  stage holds a large embedding (no decay) beside decayed blocks, one of the two, not both.
- **single-tensor**, torch's default on CPU: per parameter, `exp_avg_sq.sqrt()` and its division
  by the bias correction (`denom`) are live together for a moment, while the previous parameter's
  `denom` is still bound (the loop rebinds it after): 4 bytes x (n_prev + 2 n) in the group's
  order. The plan prices a group's two largest tensors, 4 x (2 n_largest + n_second), for the
  group where that is most: exact where they are consecutive in it (a GPT's MLP); without the
  groups (`no_decay` empty), the model's two largest.
- **fused** (`fused=True`, which pipefold does not ask for): no temporaries beyond the step counters.
- **bf16 weights with fp32 masters** (`precision="bf16-pure"`, `pipefold.runtime.master`): before
  AdamW runs, every 16-bit gradient is copied to fp32 (4 bytes per element, for all the rank's
  parameters at once), and AdamW's temporaries are fp32 as its state is.

- **fp16's loss scale** (`precision="fp16"`, `pipefold.runtime.loss_scale.DynamicLossScale`, not
  torch's GradScaler): after the pipeline's call, with the activations and autocast's copies
  freed, the overflow check runs `torch.isfinite` on each gradient (ATen: `(g == g) * (g.abs()
  != inf)`) and negates it: (element bytes + 3) x n of one gradient at a time, 7 n for the fp32
  gradients fp16 keeps (`overflow_check_bytes`); the unscale (`mul_`, `add_`) allocates nothing.
  The norm then holds 8 x (n_prev + 2 n) >= 16 n of the same gradients with the same tensors
  live, so the check never sets the update's peak and is not priced apart (measured:
  tests/runtime/test_update_temporaries.py, benchmarks/update_temporaries.py).

The norm runs before the step, so the two never overlap; gradients, weights and state are live
through both, activations are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["FLOAT64_BYTES", "STATE_BYTES", "gradient_norm_bytes", "layer_norm_bytes", "overflow_check_bytes",
           "update_temporaries"]

FLOAT64_BYTES = 8
"""The gradient norm's arithmetic is float64 whatever the gradients' dtype."""
STATE_BYTES = 4
"""AdamW's state is fp32: the parameters' own dtype in fp32 and autocast, fp32 masters with bf16 weights."""


def gradient_norm_bytes(numels: Sequence[int]) -> int:
    """The most the gradient norm holds at once over tensors of `numels` elements, in the
    order the rank visits them: 8 bytes x (n_prev + 2 n)."""
    most = 0
    previous = 0
    for numel in numels:
        most = max(most, FLOAT64_BYTES * (previous + 2 * numel))
        previous = numel
    return most


def layer_norm_bytes(layer_numels: Sequence[Sequence[int]]) -> list[int]:
    """Per layer of tensors of `layer_numels` elements (in the order a rank visits them), the most
    the gradient norm holds while over its gradients (`LayerCost.gradient_norm_bytes`): 8 bytes x
    (n_prev + 2 n), n_prev of a layer's first tensor the previous layer's last (an upper bound at
    a rank's first layer, whose previous tensor is on another rank). A rank's norm is its layers'
    largest; the model's, all layers' (`gradient_norm_bytes`)."""
    found = []
    previous = 0
    for numels in layer_numels:
        most = 0
        for numel in numels:
            most = max(most, FLOAT64_BYTES * (previous + 2 * numel))
            previous = numel
        found.append(most)
    return found


def overflow_check_bytes(numels: Sequence[int], gradient_element_bytes: int) -> int:
    """The most fp16's overflow check (`pipefold.runtime.loss_scale.DynamicLossScale.overflowed`)
    holds at once over gradients of `numels` elements: `torch.isfinite(grad)` (ATen: `(g == g) *
    (g.abs() != inf)`, an absolute value in the gradient's dtype and three bool tensors) then
    its negation, one gradient at a time: (element bytes + 3) x the largest. Never more than
    `gradient_norm_bytes` of the same tensors (16 bytes x the largest at least), so not priced
    apart."""
    return (gradient_element_bytes + 3) * max(numels, default=0)


def _single_tensor_bytes(numels: Sequence[int]) -> int:
    """The single-tensor AdamW's most within one group: 4 bytes x (2 n_largest + n_second)."""
    largest = sorted(numels, reverse=True)[:2] + [0, 0]
    return STATE_BYTES * (2 * largest[0] + largest[1])


def update_temporaries(numels: Sequence[int], *, value_bytes: int, foreach: bool, masters: bool,
                       no_decay: Sequence[bool] = ()) -> dict[str, Any]:
    """`ModelCosts`' four update fields for a model whose parameters have `numels` elements of
    `value_bytes` bytes each (4: fp32; 2: bf16 weights), stepped by AdamW's `foreach` path (else
    the single-tensor one), with fp32 `masters` of 16-bit weights or not. `no_decay`: per
    parameter, whether it is in the group without weight decay (`pipefold.job.optim.no_decay`);
    empty: one group (the single-tensor path then prices the model's two largest tensors)."""
    if value_bytes <= 0:
        raise ValueError(f"value_bytes = {value_bytes}; give the parameters' element size (4 fp32, 2 bf16)")
    if no_decay and len(no_decay) != len(numels):
        raise ValueError(f"no_decay has {len(no_decay)} entries for {len(numels)} parameters; give one per "
                         "parameter (or none)")
    flags = list(no_decay) or [False] * len(numels)
    groups = [
        [n for n, exempt in zip(numels, flags, strict=True) if exempt == wanted] for wanted in (False, True)
    ]
    ratio = STATE_BYTES / value_bytes
    return {
        # The masters' fp32 gradient copies are made for the whole rank before the step ...
        "update_bytes_per_parameter_byte": ratio if masters else 0.0,
        # ... foreach's square roots per group (AdamW steps one group at a time): the larger one.
        "update_group_bytes_per_parameter_byte": ratio if foreach else 0.0,
        "update_tensor_bytes": 0 if foreach else max(_single_tensor_bytes(group) for group in groups),
        "gradient_norm_bytes": gradient_norm_bytes(numels),
    }
