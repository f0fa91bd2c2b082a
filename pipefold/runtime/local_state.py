"""A rank's share of the model's state dict: `Pipeline.state_dict` names each local parameter
and buffer as the unsplit model names it, and `Pipeline.load_state_dict` takes this rank's
entries (its tensor-parallel slice of each) from a full or merged state dict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.model.build import name_prefix, shared_names
from pipefold.runtime.parallel.tensor_parallel import local as local_shard
from pipefold.runtime.parallel.tensor_parallel import shard_like

__all__ = ["load_local_state", "local_state_dict"]


def local_state_dict(
    modules: Mapping[int, nn.Module],
    owner: Sequence[int],
    shared: Mapping[str, Sequence[tuple[int, str]]],
) -> dict[str, Tensor]:
    """The local modules' parameters and buffers under the model's names; `owner[i]` is the layer
    index module `i` is named under, `shared` the parameters several layers hold (one name each)."""
    result: dict[str, Tensor] = {}
    for index in sorted(modules):
        module = modules[index]
        names = shared_names(index, owner[index], module, shared)
        prefix = name_prefix(owner[index], module)
        for name, value in module.state_dict().items():
            result.setdefault(names.get(name, prefix + name), value)
    return result


def load_local_state(rank: int, local: Mapping[str, Tensor], state_dict: Mapping[str, Tensor]) -> None:
    """Copy `state_dict`'s entries into this rank's tensors `local` (entries of other ranks are
    ignored; a missing local entry or another shape is a ConfigError)."""
    missing = sorted(set(local) - set(state_dict))
    if missing:
        raise ConfigError(
            f"load_state_dict: rank {rank} needs {missing}, which the state dict lacks; "
            f"save with pipe.state_dict() on every rank (or from the full model) and merge"
        )
    with torch.no_grad():
        for name, value in local.items():
            source = state_dict[name]
            if tuple(source.shape) != tuple(value.shape):
                raise ConfigError(
                    f"load_state_dict: {name} has shape {tuple(source.shape)} in the state dict but "
                    f"{tuple(value.shape)} in the model"
                )
            # A tensor-parallel parameter takes its own slice of the whole tensor.
            local_shard(value).copy_(local_shard(shard_like(source, value)))
