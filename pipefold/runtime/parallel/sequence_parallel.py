"""Sequence parallelism: the tensor-parallel ranks of a stage split the sequence between blocks.

Design notes: docs/decisions.md, "sequence parallel x pipeline".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel

from pipefold.errors import ConfigError
from pipefold.model.dropout import SeededDropout
from pipefold.runtime.parallel.tensor_parallel import plan_for

if TYPE_CHECKING:
    from pipefold.model.build import TensorMeta
    from pipefold.runtime.parallel.tensor_parallel import TensorParallelPlan

__all__ = [
    "ColwiseFromSequence",
    "DropoutOnSequence",
    "GatherSequence",
    "ScatterSequence",
    "sequence_sharded_outputs",
    "shard_boundaries",
]


def _uneven(length: int, num_shards: int) -> ConfigError:
    return ConfigError(
        f"sequence parallelism: a sequence of {length} positions does not split evenly over "
        f"{num_shards} tensor-parallel ranks; use sequence lengths divisible by {num_shards} "
        "(crop or pad the batch) or turn sequence parallelism off"
    )


class ScatterSequence(ParallelStyle):
    """Keep this tp rank's 1/tp of the module's (replicated) output along `sequence_dim`."""

    def __init__(self, *, sequence_dim: int = 1) -> None:
        super().__init__()
        self.sequence_dim = sequence_dim

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        sequence_dim, num_shards = self.sequence_dim, int(device_mesh.size())

        def scatter(_module: nn.Module, _inputs: Any, output: Tensor) -> Tensor:
            length = output.shape[sequence_dim]
            if length % num_shards != 0:
                raise _uneven(length, num_shards)
            replicated = DTensor.from_local(output, device_mesh, [Replicate()], run_check=False)
            return replicated.redistribute(device_mesh, [Shard(sequence_dim)]).to_local()

        module.register_forward_hook(scatter)
        return module


class GatherSequence(ParallelStyle):
    """Run the module on the sequence shard (`SequenceParallel`), then all-gather its output."""

    def __init__(self, *, sequence_dim: int = 1) -> None:
        super().__init__()
        self.sequence_dim = sequence_dim

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        SequenceParallel(sequence_dim=self.sequence_dim, use_local_output=False)._apply(module, device_mesh)

        def gather(_module: nn.Module, _inputs: Any, output: DTensor) -> Tensor:
            return output.redistribute(device_mesh, [Replicate()]).to_local()

        # Registered after SequenceParallel's own output hook, so it sees that hook's DTensor.
        module.register_forward_hook(gather)
        return module


class DropoutOnSequence(ParallelStyle):
    """A `SeededDropout` whose input is this tp rank's slice along `sequence_dim` (after a
    row-split linear that reduce-scatters): it draws the whole tensor's mask and keeps the
    slice, so every tp degree drops what one process drops. Any other module (an
    `nn.Identity` where the model has no dropout) is left as it is."""

    def __init__(self, *, sequence_dim: int = 1) -> None:
        super().__init__()
        self.sequence_dim = sequence_dim

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if isinstance(module, SeededDropout):
            module.sequence_shard = (
                self.sequence_dim, int(device_mesh.get_local_rank()), int(device_mesh.size())
            )
        return module


def sequence_sharded_outputs(plan: TensorParallelPlan, meta_layers: Sequence[nn.Module]) -> dict[int, int]:
    """{layer index: sequence dim} for every layer whose output is split along the sequence
    under `plan`: from a `ScatterSequence` layer up to the layer before a `GatherSequence` one."""
    sharded: dict[int, int] = {}
    dim: int | None = None
    for index, module in enumerate(meta_layers):
        style = plan_for(plan, index, module).get("")
        if isinstance(style, ScatterSequence):
            dim = style.sequence_dim
        elif isinstance(style, GatherSequence):
            dim = None
        if dim is not None:
            sharded[index] = dim
    return sharded


def shard_boundaries(
    outputs: Sequence[TensorMeta], sharded: Mapping[int, int], num_shards: int
) -> list[TensorMeta]:
    """The layers' traced output shapes as one tp rank holds them: divided by `num_shards`
    along the sequence where `sharded` says so."""
    result = list(outputs)
    for index, dim in sharded.items():
        meta = result[index]
        shapes = []
        for shape in meta.shapes:
            if shape[dim] % num_shards != 0:
                raise _uneven(shape[dim], num_shards)
            shapes.append((*shape[:dim], shape[dim] // num_shards, *shape[dim + 1 :]))
        result[index] = replace(meta, shapes=tuple(shapes))
    return result


# -- a column-split linear that keeps the sequence slice, not the gathered input ----------------


def _all_gather(local: Tensor, dim: int, group: Any) -> Tensor:
    """The tp ranks' slices of `local` concatenated along `dim`, in rank order."""
    num_shards = dist.get_world_size(group)
    moved = local.movedim(dim, 0).contiguous()  # the collective concatenates along dim 0
    gathered = moved.new_empty((num_shards * moved.shape[0], *moved.shape[1:]))
    dist.all_gather_into_tensor(gathered, moved, group=group)
    return gathered.movedim(0, dim)


def _reduce_scatter(whole: Tensor, dim: int, group: Any) -> Tensor:
    """This tp rank's slice along `dim` of the sum of every tp rank's `whole`."""
    num_shards = dist.get_world_size(group)
    moved = whole.movedim(dim, 0).contiguous()
    part = moved.new_empty((moved.shape[0] // num_shards, *moved.shape[1:]))
    dist.reduce_scatter_tensor(part, moved, group=group)
    return part.movedim(0, dim)


def _local(tensor: Tensor) -> Tensor:
    """This rank's part (differentiably: the gradient comes back as the DTensor's)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _runs(ctx: Any, index: int) -> bool:
    """Whether the backward in progress needs the gradient of the forward's input `index`:
    I asks for the stage inputs only and W for the weights only (docs/decisions.md, "split
    backward"), so each half computes (and communicates) only its own."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    if hasattr(node, "variable"):
        # A leaf's AccumulateGrad, which autograd cannot be asked about inside autograd.grad:
        # compute it (where the linear's input is the stage input itself, W then computes the
        # input gradient again, correct and wasted; the GPT's blocks norm their input first).
        return True
    return bool(torch._C._will_engine_execute_node(node))


class _GatheredLinear(torch.autograd.Function):
    """y = x_whole @ w.T + b where x_whole all-gathers the sequence slices `x`; keeps `x` only."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, dim: int, group: Any
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dim, ctx.group = dim, group
        return F.linear(_all_gather(x, dim, group), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if _runs(ctx, 0):
            grad_x = _reduce_scatter(grad @ weight, ctx.dim, ctx.group)
        if _runs(ctx, 1):
            # Megatron's trade: all-gather the slice again rather than keep the whole input.
            gathered = _all_gather(x, ctx.dim, ctx.group)
            grad_weight = grad.flatten(0, -2).t() @ gathered.flatten(0, -2)
        if _runs(ctx, 2):
            grad_bias = grad.flatten(0, -2).sum(0)
        return grad_x, grad_weight, grad_bias, None, None


class ColwiseFromSequence(ParallelStyle):
    """A column-split `nn.Linear` whose input is the sequence slice of this tp rank.

    What `ColwiseParallel(input_layouts=Shard(1))` computes (the output is this rank's
    columns for every position), but the forward keeps the slice for backward instead of the
    all-gathered input, and the weight-gradient half all-gathers it again (Megatron's
    sequence parallelism): the layer's kept input shrinks by tp. The weight and bias are
    `Shard(0)` DTensors as under `ColwiseParallel`, so checkpoints and optimizers see no
    difference. The input gradient is reduce-scattered back to the slices.
    """

    def __init__(self, *, sequence_dim: int = 1) -> None:
        super().__init__()
        self.sequence_dim = sequence_dim

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"ColwiseFromSequence splits an nn.Linear; got {type(module).__name__}: use torch's "
                "ColwiseParallel(input_layouts=Shard(1)) for other modules"
            )
        for name, param in list(module.named_parameters(recurse=False)):
            # Every tp rank built the whole weight from the same seed: keep the slice, no communication.
            shard = distribute_tensor(param.detach(), device_mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(name, nn.Parameter(shard, requires_grad=param.requires_grad))
        dim, group = self.sequence_dim, device_mesh.get_group()

        def forward(x: Tensor) -> Tensor:
            weight, bias = module.weight, module.bias
            out: Tensor = _GatheredLinear.apply(  # type: ignore[no-untyped-call]
                _local(x), _local(weight), None if bias is None else _local(bias), dim, group
            )
            return out

        # On the instance: this module's forward, not every nn.Linear's.
        module.forward = forward  # type: ignore[method-assign,assignment]
        return module
