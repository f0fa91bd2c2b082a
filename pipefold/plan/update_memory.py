"""What the update after a flush step allocates for a moment: the gradient norm's and AdamW's temporaries.

    fields = update_temporaries([p.numel() for p in params], value_bytes=4, foreach=True, masters=False)
    costs = ModelCosts.from_profile(..., **fields)      # priced per rank: `update_bytes`

`pipefold train` computes the gradient norm (`pipefold.runtime.clip`, always: it is logged), then
steps `torch.optim.AdamW` with torch's defaults (amsgrad, maximize, capturable off), one call per
parameter group (weight decay / none: `pipefold.job.optim.parameter_groups`). What each allocates
beyond the weights, gradients and state the plan already counts (torch 2.x, `torch/optim/adam.py`):

- **The gradient norm** converts each gradient to float64 and takes its absolute value
  (`grad.to(float64).abs()`: two float64 copies at once) while the previous gradient's `values` is
  still bound, then squares it (`values.pow(2)`): 8 bytes x (n_prev + 2 n) at most, for the
  consecutive tensors of n_prev and n elements that make it largest.
- **foreach ("multi-tensor")**, torch's default when every parameter is on CUDA (or another
  device with foreach kernels): `torch._foreach_sqrt(exp_avg_sqs)` makes one tensor per
  parameter of the group, in the state's dtype, live until the call returns: the group's whole
  state size. Everything else runs in place (decoupled weight decay `_foreach_mul_`, `lerp_`,
  `mul_`/`addcmul_`, `addcdiv_`); the bias corrections are Python floats.
- **single-tensor**, torch's default on CPU: per parameter, `exp_avg_sq.sqrt()` and its division
  by the bias correction (`denom`) are live together for a moment, while the previous parameter's
  `denom` is still bound (the loop rebinds it after): 4 bytes x (n_prev + 2 n) in the group's
  order. The plan does not know which parameters decay, so it prices the two largest tensors:
  4 x (2 n_largest + n_second), the same where they are consecutive in a group (a GPT's MLP).
- **fused** (`fused=True`, which pipefold does not ask for): no temporaries beyond the step counters.
- **bf16 weights with fp32 masters** (`precision="bf16-pure"`, `pipefold.runtime.master`): before
  AdamW runs, every 16-bit gradient is copied to fp32 (4 bytes per element, for all the rank's
  parameters at once), and AdamW's temporaries are fp32 as its state is.

The norm runs before the step, so the two never overlap; gradients, weights and state are live
through both, activations are not. The step's foreach temporaries are priced on the rank's whole
parameters: an upper bound, exact where one group (the decayed matrices) holds nearly all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["FLOAT64_BYTES", "STATE_BYTES", "gradient_norm_bytes", "update_temporaries"]

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


def update_temporaries(numels: Sequence[int], *, value_bytes: int, foreach: bool, masters: bool
                       ) -> dict[str, Any]:
    """`ModelCosts`' three update fields for a model whose parameters have `numels` elements of
    `value_bytes` bytes each (4: fp32; 2: bf16 weights), stepped by AdamW's `foreach` path (else
    the single-tensor one), with fp32 `masters` of 16-bit weights or not."""
    if value_bytes <= 0:
        raise ValueError(f"value_bytes = {value_bytes}; give the parameters' element size (4 fp32, 2 bf16)")
    # Per parameter byte of a rank: its fp32 gradient copies (masters), and foreach's list of square roots.
    per_byte = STATE_BYTES / value_bytes * ((1 if masters else 0) + (1 if foreach else 0))
    largest = sorted(numels, reverse=True)[:2] + [0, 0]
    tensor = 0 if foreach else STATE_BYTES * (2 * largest[0] + largest[1])
    return {
        "update_bytes_per_parameter_byte": per_byte,
        "update_tensor_bytes": tensor,
        "gradient_norm_bytes": gradient_norm_bytes(numels),
    }
