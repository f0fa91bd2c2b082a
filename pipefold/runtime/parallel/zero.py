"""ZeRO stage 1 for a pipeline's data-parallel replicas: optimizer state sharded over "dp".

    pipe = Pipeline(layers, loss_fn=..., parallel=ParallelOptions(process_group=mesh))  # ("dp", "pp")
    optimizer = sharded_optimizer(pipe, torch.optim.AdamW, lr=3e-4)
    loss = pipe.step(x, y); optimizer.step(); optimizer.zero_grad()

bf16 weights (`RuntimeOptions(precision="bf16-pure")`): shard an optimizer that keeps fp32
masters, `sharded_optimizer(pipe, fp32_master_weights(torch.optim.AdamW), lr=3e-4)`. Each
replica's local optimizer holds the parameters it owns, so it keeps their fp32 masters and
moments only (1/dp of them), steps them, rounds them into the bf16 weights, and the replicas
then send each other the updated weights in bf16 (the parameters' own dtype).

Design notes: docs/decisions.md, "ZeRO-1 over the replicas".
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from pipefold.errors import ConfigError

if TYPE_CHECKING:  # checkpoint.py imports this module; the pipeline is only a parameter here
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from pipefold.runtime.pipeline import Pipeline

# Imported on first use: torch.distributed.optim scripts its functional optimizers with
# torch.jit at import (a deprecation warning each, and time), which only ZeRO's users need.
_ZERO_MODULE = "torch.distributed.optim.zero_redundancy_optimizer"

__all__ = ["consolidate", "is_sharded_optimizer", "sharded_optimizer"]


def sharded_optimizer(
    pipe: Pipeline, optimizer_class: type[torch.optim.Optimizer], *, params: Any = None, **defaults: Any
) -> ZeroRedundancyOptimizer:
    """`optimizer_class(**defaults)` over this rank's parameters (or `params`: them in param
    groups), its state sharded over the pipeline's data-parallel replicas (see docs/decisions.md,
    "ZeRO-1 over the replicas"). Call on every rank; step it after `pipe.step` as any optimizer.
    With bf16 weights give `fp32_master_weights(cls)` (module docstring)."""
    # The rulebook: replicas to shard over, and whole (not tensor-parallel) parameters.
    replace(pipe.parallel_config, zero=True).check({"zero": "sharded_optimizer"})
    if not isinstance(optimizer_class, type) or not issubclass(optimizer_class, torch.optim.Optimizer):
        raise ConfigError(
            f"sharded_optimizer: optimizer_class = {optimizer_class!r}; give a torch.optim.Optimizer "
            "subclass (e.g. torch.optim.AdamW)"
        )
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(
        list(pipe.parameters()) if params is None else params,
        optimizer_class=optimizer_class,
        process_group=pipe.data_parallel_group,
        **defaults,
    )


def is_sharded_optimizer(optimizer: Any) -> bool:
    """Whether `optimizer` is a ZeroRedundancyOptimizer (none exists before its module loads)."""
    module = sys.modules.get(_ZERO_MODULE)
    return module is not None and isinstance(optimizer, module.ZeroRedundancyOptimizer)


def consolidate(optimizers: list[torch.optim.Optimizer]) -> None:
    """Gather each sharded optimizer's state on replica 0 (collective over "dp": every
    replica calls it, in the same order), so that its `state_dict()` is the whole state."""
    for optimizer in optimizers:
        if is_sharded_optimizer(optimizer):
            optimizer.consolidate_state_dict(to=0)  # type: ignore[attr-defined]
