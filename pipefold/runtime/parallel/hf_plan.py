"""The tensor-parallel plan for Hugging Face causal LMs cut by `pipefold.split`:
`hf_tensor_parallel_plan()` (`ParallelOptions(tensor_parallel=...)`, and what `pipefold train
--model <dir> --tensor-parallel T` uses), and the styles it needs beyond torch's: `LocalHeads`
(Llama-family attention), `Conv1DColwise` / `Conv1DRowwise` and `GPT2LocalHeads` (GPT-2).

    >>> plan = hf_tensor_parallel_plan()
    >>> Pipeline(pipefold.split(llama), ..., parallel=ParallelOptions(process_group=mesh,
    ...                                                             tensor_parallel=plan))

Blocks are found by their submodules' names, so transformers is never imported here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel
from torch.distributed.tensor.placement_types import _StridedShard

from pipefold.errors import ConfigError
from pipefold.model.split_graph import GraphPiece
from pipefold.runtime.parallel.tensor_parallel import TensorParallelPlan, local

__all__ = ["Conv1DColwise", "Conv1DRowwise", "GPT2LocalHeads", "LocalHeads", "hf_tensor_parallel_plan"]


class LocalHeads(ParallelStyle):
    """The attention module of a Hugging Face Llama-family block (`q_proj`, `k_proj`, `v_proj`,
    `o_proj`), for `hf_tensor_parallel_plan`: checks that the degree divides its query heads and
    its key/value heads (a column split of the projections must hand each rank whole heads, and
    the same query-head groups of grouped-query attention), and rewrites any head count the
    module holds to this rank's. The installed transformers reshapes with `-1` heads (from the
    projections' local outputs), and the query heads per key/value head are the same on every
    rank, so there is nothing to rewrite there; older versions read `self.num_heads` /
    `self.num_key_value_heads` in their reshapes."""

    _COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads")

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        degree = int(device_mesh.size())
        head_dim = _head_dim(module)
        query_heads = _out_features(module, "q_proj") // head_dim
        kv_heads = _out_features(module, "k_proj") // head_dim
        for what, count in (("attention heads", query_heads), ("key/value heads", kv_heads)):
            if count % degree:
                raise ConfigError(
                    f"tensor_parallel={degree}: {_path_of(module)} has {count} {what}, which {degree} "
                    f"tensor-parallel ranks cannot share (each rank takes whole heads); use a degree "
                    f"dividing {query_heads} and {kv_heads} (e.g. {math.gcd(query_heads, kv_heads)})"
                )
        for name in self._COUNTS:
            value = module.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(module, name, value // degree)
        return module


def _out_features(module: nn.Module, name: str) -> int:
    linear = getattr(module, name)
    return int(linear.out_features if isinstance(linear, nn.Linear) else linear.weight.shape[0])


def _head_dim(module: nn.Module) -> int:
    head_dim = module.__dict__.get("head_dim")
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, int) and heads > 0:
        return _out_features(module, "q_proj") // heads
    raise ConfigError(
        f"tensor_parallel: {type(module).__name__} has neither head_dim nor config.num_attention_heads; "
        "hf_tensor_parallel_plan splits Hugging Face Llama-family attention"
    )


def _path_of(module: nn.Module) -> str:
    layer = getattr(module, "layer_idx", None)
    return f"{type(module).__name__} of block {layer}" if isinstance(layer, int) else type(module).__name__


# -- GPT-2: Conv1D projections ------------------------------------------------------------------


class _CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: the identity forward; backward, the sum of the tp ranks' input gradients
    (each column shard contributes a part)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: forward, the sum of the tp ranks' partial outputs; backward, the identity."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _conv1d(module: nn.Module, what: str) -> Any:
    """`module`, checked to be a transformers Conv1D (typed loosely: its forward is replaced)."""
    weight = getattr(module, "weight", None)
    if type(module).__name__ != "Conv1D" or not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ConfigError(
            f"tensor_parallel: {what} expects a transformers Conv1D (weight [in, out]), got "
            f"{type(module).__name__}"
        )
    return module


class Conv1DColwise(ParallelStyle):
    """A GPT-2 `Conv1D` (y = x W + b, W of shape [in, out]) split by output features: W's
    columns and b over the tp ranks, x whole; each rank returns its columns (a plain tensor).
    `groups` > 1: the output is `groups` blocks side by side (c_attn: all queries, all keys, all
    values) and each rank takes its slice of every block (its heads' queries, keys and values),
    a DTensor `_StridedShard` (gathered back in the module's layout)."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups

    def _apply(self, layer: nn.Module, device_mesh: Any) -> nn.Module:
        module = _conv1d(layer, "Conv1DColwise")
        degree = int(device_mesh.size())
        columns = int(module.weight.shape[1])
        if columns % (self.groups * degree):
            raise ConfigError(
                f"tensor_parallel={degree}: a Conv1D of {columns} output features in {self.groups} "
                f"block(s) does not split evenly over {degree} ranks; use a degree dividing "
                f"{columns // self.groups}"
            )
        weight_at, bias_at = (
            (_StridedShard(1, split_factor=self.groups), _StridedShard(0, split_factor=self.groups))
            if self.groups > 1
            else (Shard(1), Shard(0))
        )
        module.weight = nn.Parameter(distribute_tensor(module.weight, device_mesh, [weight_at]))
        module.bias = nn.Parameter(distribute_tensor(module.bias, device_mesh, [bias_at]))
        group = device_mesh.get_group()

        def forward(x: Tensor) -> Tensor:
            weight, bias = local(module.weight), local(module.bias)
            x = _CopyToTensorParallel.apply(x, group)  # type: ignore[no-untyped-call]
            out = torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight)
            return out.view(*x.shape[:-1], weight.shape[1])

        module.forward = forward
        return layer


class Conv1DRowwise(ParallelStyle):
    """A GPT-2 `Conv1D` split by input features: W's rows over the tp ranks, x arriving split
    by its last dim (a column split's output); the partial products are summed over the ranks
    (one all-reduce) and b, whole on every rank, added once."""

    def _apply(self, layer: nn.Module, device_mesh: Any) -> nn.Module:
        module = _conv1d(layer, "Conv1DRowwise")
        degree = int(device_mesh.size())
        rows = int(module.weight.shape[0])
        if rows % degree:
            raise ConfigError(
                f"tensor_parallel={degree}: a Conv1D of {rows} input features does not split evenly "
                f"over {degree} ranks; use a degree dividing {rows}"
            )
        module.weight = nn.Parameter(distribute_tensor(module.weight, device_mesh, [Shard(0)]))
        group = device_mesh.get_group()

        def forward(x: Tensor) -> Tensor:
            weight = local(module.weight)
            partial = torch.mm(x.reshape(-1, x.shape[-1]), weight)
            out: Tensor = _ReduceFromTensorParallel.apply(partial, group)  # type: ignore[no-untyped-call]
            bias: Tensor = module.bias
            return (out + bias).view(*x.shape[:-1], weight.shape[1])

        module.forward = forward
        return layer


class GPT2LocalHeads(ParallelStyle):
    """A GPT-2 attention module for `hf_tensor_parallel_plan`: refuses a degree that does not
    divide its heads, and gives it this rank's `split_size` (its forward splits c_attn's output
    into queries, keys and values by it) and `num_heads`."""

    def _apply(self, layer: nn.Module, device_mesh: Any) -> nn.Module:
        module: Any = layer
        degree = int(device_mesh.size())
        heads = module.__dict__.get("num_heads")
        split_size = module.__dict__.get("split_size")
        if not isinstance(heads, int) or not isinstance(split_size, int):
            raise ConfigError(
                f"tensor_parallel: {type(module).__name__} holds no num_heads / split_size; "
                "GPT2LocalHeads splits transformers' GPT2Attention"
            )
        if heads % degree:
            raise ConfigError(
                f"tensor_parallel={degree}: {_path_of(module)} has {heads} attention heads, which {degree} "
                f"tensor-parallel ranks cannot share (each rank takes whole heads); use a degree dividing "
                f"{heads}"
            )
        module.num_heads = heads // degree
        module.split_size = split_size // degree
        return layer


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")
_GPT2_ATTENTION = ("c_attn", "c_proj")
_GPT2_MLP = ("c_fc", "c_proj")


def hf_tensor_parallel_plan() -> TensorParallelPlan:
    """How `pipefold train --model <dir> --tensor-parallel` splits a Hugging Face model (gpt2,
    llama, mistral, qwen2) cut by `pipefold.split` (`ParallelOptions(tensor_parallel=...)`):
    Megatron's split of each block, found by its submodules' names, whatever the block's path.
    Two all-reduces per block forward (two in its backward); the embeddings, the norms and the
    head stay whole (replicated), as in `gpt_tensor_parallel_plan`.

    - Llama family: the attention's `q_proj`, `k_proj`, `v_proj` by columns (whole heads, and
      whole key/value heads of grouped-query attention, per rank) and `o_proj` by rows; the MLP's
      `gate_proj` and `up_proj` by columns and `down_proj` by rows. The degree must divide the
      attention heads and the key/value heads (`LocalHeads` refuses it, naming both).
    - GPT-2: `c_attn` by columns, each rank taking its heads' slice of the queries, of the keys
      and of the values (`Conv1DColwise(groups=3)`: the fused output is all queries, then all
      keys, then all values), `attn.c_proj` by rows; `c_fc` by columns, `mlp.c_proj` by rows.
      `GPT2LocalHeads` gives the attention its rank's `split_size` and refuses a degree that
      does not divide the heads.

    Pieces cut at named points (`split_points`) are refused: they run captured operations on
    the module's tensors, not its submodules."""

    def by_layer(index: int, module: nn.Module) -> dict[str, Any] | None:
        entries: dict[str, Any] = {}
        for path, sub in module.named_modules():
            children = dict(sub.named_children())
            prefix = f"{path}." if path else ""
            if all(name in children for name in _ATTENTION):
                entries[path] = LocalHeads()  # first: refuses a degree that splits a head
                entries.update({f"{prefix}{name}": ColwiseParallel() for name in _ATTENTION[:3]})
                entries[f"{prefix}o_proj"] = RowwiseParallel()
            elif all(name in children for name in _GATED_MLP):
                entries[f"{prefix}gate_proj"] = ColwiseParallel()
                entries[f"{prefix}up_proj"] = ColwiseParallel()
                entries[f"{prefix}down_proj"] = RowwiseParallel()
            elif all(name in children for name in _GPT2_ATTENTION):
                if "q_attn" in children:
                    raise ConfigError(
                        f"tensor_parallel: layer {index} holds a GPT-2 cross-attention ({path}); "
                        "hf_tensor_parallel_plan splits decoder-only self-attention"
                    )
                entries[path] = GPT2LocalHeads()  # first: refuses a degree that splits a head
                entries[f"{prefix}c_attn"] = Conv1DColwise(groups=3)  # [queries | keys | values]
                entries[f"{prefix}c_proj"] = Conv1DRowwise()
            elif all(name in children for name in _GPT2_MLP):
                entries[f"{prefix}c_fc"] = Conv1DColwise()
                entries[f"{prefix}c_proj"] = Conv1DRowwise()
        if entries and isinstance(module, GraphPiece):
            raise ConfigError(
                f"tensor_parallel: layer {index} is a piece cut at named points (split_points), which runs "
                "the captured operations on the module's tensors, not its submodules, so a plan cannot "
                "split them; split the model at its blocks (pipefold.split without split_points)"
            )
        return entries or None

    return by_layer
