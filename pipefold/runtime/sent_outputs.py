"""Free a stage's output once it has been sent: the executor keeps the output only as the root
of the stage's backward, and autograd needs its graph there, not its values.

    released = release_sent(outputs)    # after the send copied or posted them
    shape = output_shape(output)        # the shape the output had (for the backward's checks)

Megatron-LM does the same (`deallocate_output_tensor`): without it every micro-batch in flight
holds one boundary tensor per stage until its backward, which the planner's memory model does
not count. Only a stage's single output is freed, and only a plain tensor that owns its storage,
carries a graph and is seeded through the engine's entry without a Python shape check:
- a view frees nothing (its base holds the storage), and a leaf is an input the backward reads;
- one of several outputs may be an input an op of the stage saved for its backward (a skip
  connection sent on beside the block that read it), and autograd saves such an input as the
  tensor itself, so emptying it would change that backward. A single output is the stage's last
  result: the ops that read it are not in its backward, and what autograd saved of an output (an
  activation's result, say) it keeps through its own reference to the storage, so gradients do
  not change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SENT_SHAPE", "output_shape", "release_sent"]

_SHAPE = "_pipefold_sent_shape"
"""The attribute a released output keeps its shape in."""
SENT_SHAPE = _SHAPE
"""`_SHAPE` for code that inlines `output_shape` (the backward's one-output path)."""

# The backward seeds a released output through autograd's engine entry (runtime.backward's
# `_run_engine`), which checks each seed against the graph's own record of the shape; the public
# torch.autograd.backward would compare it with the emptied tensor instead.
_ENGINE_ENTRY = getattr(torch.autograd.graph, "_engine_run_backward", None) is not None


_EMPTY: dict[tuple[torch.dtype, torch.device], Tensor] = {}
"""One empty tensor per (dtype, device) that every released output of that kind is set to: it
has no elements, so sharing its storage shares nothing, and making a new one per message cost
a tensor construction (docs/decisions.md, "byte copies into the channel")."""


def release_sent(outputs: Sequence[Tensor]) -> bool:
    """Replace the data of a stage's single output by an empty tensor where it may (see the
    module's note); True where it did. Call only after the send no longer reads the output."""
    if not _ENGINE_ENTRY or len(outputs) != 1:
        return False
    (output,) = outputs
    if (
        type(output) is not Tensor
        or output.grad_fn is None
        or output._base is not None
        or hasattr(output, _SHAPE)
    ):
        return False
    setattr(output, _SHAPE, output.shape)
    key = (output.dtype, output.device)
    try:  # a subscript, not `dict.get`: once per sent message, and the key is there after the first
        empty = _EMPTY[key]
    except KeyError:
        empty = _EMPTY[key] = torch.empty(0, dtype=output.dtype, device=output.device)
    output.data = empty
    return True


def output_shape(output: Tensor) -> torch.Size:
    """The shape `output` had before `release_sent` (its own shape otherwise)."""
    shape: torch.Size = getattr(output, _SHAPE, output.shape)
    return shape
