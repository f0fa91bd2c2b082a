"""Optimizer state in checkpoints, keyed by parameter name rather than the optimizer's integer ids.

Saving names each parameter's state by the name `nn.Sequential(*layers)` gives its parameter
("optimizer/3.weight/exp_avg") and stores each param group's hyperparameters as JSON; loading
maps those names back onto whatever integer-id layout this rank's optimizer has now, so the
state follows its parameter into any partition or rank count. A ZeRO-sharded optimizer is read
through its consolidated whole state. checkpoint.py writes and reads the tensors themselves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipefold.errors import ConfigError
from pipefold.runtime.parallel.tensor_parallel import shard_like
from pipefold.runtime.parallel.zero import is_sharded_optimizer

if TYPE_CHECKING:
    from pipefold.runtime.pipeline import Pipeline

__all__ = ["OPTIMIZER_PREFIX", "Optimizers", "as_list", "load_optimizer", "optimizer_plan"]

OPTIMIZER_PREFIX = "optimizer/"
"""The key prefix of optimizer state in a checkpoint: "optimizer/<parameter name>/<state key>"."""

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


def as_list(optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    found = list(optimizer)
    for item in found:
        if not isinstance(item, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer={optimizer!r}: give a torch.optim.Optimizer, a list of them, or None "
                f"(got a {type(item).__name__} in the list)"
            )
    return found


def state_by_parameter(optimizer: torch.optim.Optimizer) -> Mapping[Any, Mapping[str, Any]]:
    """The optimizer's state per parameter: its `state`, or for a ZeRO-sharded one (consolidated
    first) the whole state its `state_dict()` holds under the global parameter indices."""
    if not is_sharded_optimizer(optimizer):
        return optimizer.state
    whole_state = optimizer.state_dict()
    found: dict[Any, Mapping[str, Any]] = {}
    for group, layout in zip(optimizer.param_groups, whole_state["param_groups"], strict=True):
        for param, index in zip(group["params"], layout["params"], strict=True):
            found[param] = whole_state["state"].get(index) or {}
    return found


def _layout(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's integer-id layout of its param groups (a ZeRO-sharded one's global one,
    which its `state_dict()` gives only after a consolidation)."""
    if is_sharded_optimizer(optimizer):
        return torch.optim.Optimizer.state_dict(optimizer)
    return optimizer.state_dict()


def parameter_names(pipe: Pipeline) -> dict[int, str]:
    return {id(param): name for name, param in pipe.named_parameters()}


def name_of(param: Tensor, names: Mapping[int, str], rank: int) -> str:
    name = names.get(id(param))
    if name is None:
        raise ConfigError(
            f"rank {rank}: the optimizer holds a parameter of shape {tuple(param.shape)} that is not one of "
            "this rank's pipeline parameters; build it from pipe.parameters()"
        )
    return name


def group_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group without its params, as JSON (tuples become lists, 1-element tensors numbers)."""
    result: dict[str, Any] = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        elif isinstance(value, (tuple, list)):
            value = list(value)
        try:
            json.dumps(value)
        except TypeError:
            raise ConfigError(
                f"optimizer param group entry {key!r} is a {type(value).__name__}; checkpoints store "
                "hyperparameters as JSON (numbers, strings, lists of them)"
            ) from None
        result[key] = value
    return result


def optimizer_plan(
    pipe: Pipeline, optimizers: list[torch.optim.Optimizer], meta: Mapping[str, Any], target: Path
) -> dict[str, Tensor]:
    saved = meta["optimizer"]
    if saved is None:
        raise ConfigError(
            f"checkpoint {str(target)!r} holds no optimizer state; load it without optimizer=, or save "
            "with save_checkpoint(..., optimizer=...)"
        )
    names = parameter_names(pipe)
    plan: dict[str, Tensor] = {}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = name_of(param, names, pipe.rank)
                if name not in saved["group_of"]:
                    raise ConfigError(
                        f"checkpoint {str(target)!r} has no optimizer entry for parameter {name!r}; it was "
                        "saved with an optimizer that did not hold it"
                    )
                for key, entry in saved["state"].get(name, {}).items():
                    # Optimizer state may differ from its parameter (Adam's scalar step), so only shape is
                    # checked against the saved entry's own description; torch casts on load_state_dict.
                    plan[f"{OPTIMIZER_PREFIX}{name}/{key}"] = torch.empty(
                        tuple(entry["shape"]), dtype=getattr(torch, entry["dtype"])
                    )
    return plan


def load_optimizer(
    pipe: Pipeline, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], plan: Mapping[str, Tensor]
) -> None:
    """Give `optimizer` the saved state in its own integer-id layout, then let torch load it."""
    names = parameter_names(pipe)
    current = _layout(optimizer)
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    for layout, group in zip(current["param_groups"], optimizer.param_groups, strict=True):
        param_names = [name_of(param, names, pipe.rank) for param in group["params"]]
        indices = {saved["group_of"][name] for name in param_names}
        if len(indices) > 1:
            raise ConfigError(
                f"an optimizer param group holds {param_names}, which were saved in param groups with "
                f"different hyperparameters ({sorted(indices)}); group the parameters as when saving"
            )
        restored = dict(layout)
        if indices:
            restored.update(_restore_hyperparameters(saved["param_groups"][indices.pop()], layout))
        groups.append(restored)
        for index, name, param in zip(layout["params"], param_names, group["params"], strict=True):
            entry: dict[str, Any] = {
                # A tensor-parallel parameter's state (Adam's moments) is sharded like it.
                key: shard_like(plan[f"{OPTIMIZER_PREFIX}{name}/{key}"], param)
                for key in saved["state"].get(name, {})
            }
            entry.update(saved["scalars"].get(name, {}))
            if entry:
                state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if is_sharded_optimizer(optimizer):
        # ZeroRedundancyOptimizer also keeps what it loaded in its own `state`, cast to each
        # parameter's dtype (for bf16 weights, a second, bf16 copy of the fp32 masters and
        # moments). Its local optimizer (`.optim`) holds the state it steps, and consolidation
        # rebuilds the whole state from those.
        optimizer.state.clear()


def _restore_hyperparameters(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """Saved values in the types the live group uses (tuples for betas, tensors for tensor lr)."""
    restored: dict[str, Any] = {}
    for key, value in saved.items():
        now = current.get(key)
        if isinstance(now, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(now, Tensor):
            value = torch.tensor(value, dtype=now.dtype, device=now.device)
        restored[key] = value
    return restored
