"""Tensor parallelism inside each stage: the layers of a stage split over a "tp" mesh dim.

Design notes: docs/decisions.md, "tensor parallel x pipeline" and "tensor-parallel checkpoints".
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from pipefold.errors import ConfigError

__all__ = [
    "TensorParallelPlan",
    "apply_tensor_parallel",
    "check_plan",
    "is_sharded",
    "local",
    "shard_like",
    "tensor_parallel_mesh",
    "whole",
]

TensorParallelPlan: TypeAlias = Mapping[str, Any] | Callable[[int, nn.Module], Mapping[str, Any] | None]
"""{submodule pattern: ParallelStyle} for every layer, or (layer index, module) -> that (or None).
The pattern "" names the layer itself (`ScatterSequence` on a position embedding, say)."""


def has_tp_dim(process_group: object) -> bool:
    """Whether `process_group` is a DeviceMesh with a "tp" dim."""
    return hasattr(process_group, "get_group") and "tp" in tuple(
        getattr(process_group, "mesh_dim_names", None) or ()
    )


def tensor_parallel_mesh(process_group: Any) -> Any:
    """The 1-D "tp" sub-mesh of a `DeviceMesh` that has one, else None."""
    return process_group["tp"] if has_tp_dim(process_group) else None


def check_plan(plan: object, process_group: object) -> None:
    """Refuse a plan without a "tp" dim, a "tp" dim without a plan, and plans of the wrong type."""
    has_tp = has_tp_dim(process_group)
    if plan is None:
        if has_tp:
            raise ConfigError(
                "process_group: the DeviceMesh has a 'tp' dim but tensor_parallel is None; pass "
                "tensor_parallel={'fc1': ColwiseParallel(), 'fc2': RowwiseParallel()} (the split of each "
                "layer, see torch.distributed.tensor.parallel) or drop the 'tp' dim"
            )
        return
    if not has_tp:
        raise ConfigError(
            "tensor_parallel is given but process_group is not a DeviceMesh with a 'tp' dim; build it "
            "with init_device_mesh(device, (pp, tp), mesh_dim_names=('pp', 'tp'))"
        )
    if callable(plan) and not isinstance(plan, Mapping):
        return
    if not isinstance(plan, Mapping) or not plan:
        raise ConfigError(
            f"tensor_parallel = {plan!r}; give a non-empty mapping {{submodule pattern: ParallelStyle}} "
            "or a function (layer index, module) -> such a mapping"
        )
    for pattern, style in plan.items():
        if not isinstance(pattern, str) or not isinstance(style, ParallelStyle):
            raise ConfigError(
                f"tensor_parallel[{pattern!r}] = {style!r}; keys are submodule name patterns ('fc1', "
                "'attn.head_qkv', 'mlp.*') and values ParallelStyle instances (ColwiseParallel(), ...)"
            )


def _matches(pattern: str, name: str) -> bool:
    """Whether dotted submodule `name` matches `pattern` token by token, as parallelize_module does."""
    tokens, parts = pattern.split("."), name.split(".")
    return len(tokens) == len(parts) and all(
        fnmatch.fnmatch(p, t) for p, t in zip(parts, tokens, strict=True)
    )


def plan_for(plan: TensorParallelPlan, index: int, module: nn.Module) -> dict[str, Any]:
    """The entries of `plan` that name a submodule of layer `index` (`module`); the pattern ""
    names the layer itself."""
    entries = plan(index, module) if callable(plan) and not isinstance(plan, Mapping) else plan
    if entries is None:
        return {}
    if not isinstance(entries, Mapping):
        raise ConfigError(
            f"tensor_parallel(layer {index}) returned {entries!r}; return a mapping {{submodule "
            "pattern: ParallelStyle}} or None to keep the layer whole"
        )
    names = [name for name, _ in module.named_modules() if name]
    return {
        pattern: style
        for pattern, style in entries.items()
        if pattern == "" or any(_matches(pattern, n) for n in names)
    }


def apply_tensor_parallel(modules: Mapping[int, nn.Module], mesh: Any, plan: TensorParallelPlan) -> int:
    """Split every layer of `modules` over the 1-D `mesh` by `plan`; returns how many layers it split."""
    num_split = 0
    for index in sorted(modules):
        entries = plan_for(plan, index, modules[index])
        itself = entries.pop("", None)
        if itself is not None:
            # parallelize_module takes a style for the module itself, not under a name.
            parallelize_module(modules[index], mesh, itself)
        if entries:
            parallelize_module(modules[index], mesh, entries)
        num_split += itself is not None or bool(entries)
    return num_split


def is_sharded(tensor: Tensor) -> bool:
    """Whether `tensor` is a DTensor (a tensor-parallel parameter or gradient)."""
    return isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of `tensor`: its local shard for a DTensor, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: Tensor) -> Tensor:
    """The whole tensor: a DTensor gathered over its mesh (a collective: every rank of the
    mesh calls it, in the same order), anything else as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` laid out as `like`: this rank's shard as a DTensor of `like`'s mesh and
    placements when `like` is a DTensor of `full`'s shape (no communication: every rank
    holds `full` and keeps its own slice), else `full` unchanged."""
    if not isinstance(like, DTensor) or tuple(full.shape) != tuple(like.shape):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
