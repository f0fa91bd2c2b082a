"""The training job's optimizer, learning-rate schedule and gradient accumulation.

    groups = parameter_groups(pipe.local_modules.values(), pipe.parameters(), weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups, lr=3e-3)
    scheduler = lr_scheduler(optimizer, schedule="cosine", warmup_steps=20, total_steps=300,
                             lr=3e-3, min_lr=3e-4)
    loss = accumulated_step(pipe, [batch_1, batch_2])   # one optimizer step's gradient

- Weight decay applies to matrices only: norms, biases (any parameter of fewer than two
  dimensions) and embeddings (a tied embedding / head included) form a group without decay,
  as GPT-2, Megatron and torchtitan do.
- The schedule is a `torch.optim.lr_scheduler.LambdaLR` with a closed-form factor: a linear
  warm-up from lr / warmup_steps to lr over `warmup_steps` steps, then constant, or cosine or
  linear decay to `min_lr` at `total_steps`. Closed-form, so a resumed run needs only its step
  count; tests/test_optim.py checks it against torch's LinearLR / CosineAnnealingLR.
- `accumulated_step` runs the pipeline on several batches and averages their gradients: k
  equal batches give the gradient of one batch k times as large (exact up to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.job.sections import LR_SCHEDULES
from pipefold.runtime import Pipeline
from pipefold.runtime.adaptive import AdaptiveRunner
from pipefold.runtime.clip import scale_gradients_

__all__ = ["LR_SCHEDULES", "accumulated_step", "apply_update", "lr_factor", "lr_scheduler", "no_decay",
           "parameter_groups"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or "Embedding" in type(module).__name__


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


def no_decay(modules: Iterable[nn.Module]) -> set[int]:
    """Ids of the parameters weight decay leaves alone: those held directly by an embedding or
    a norm module, and every parameter of fewer than two dimensions (biases, gains)."""
    exempt: set[int] = set()
    for root in modules:
        for module in root.modules():
            whole = _is_embedding(module) or _is_norm(module)
            for param in module.parameters(recurse=False):
                if whole or param.dim() < 2:
                    exempt.add(id(param))
    return exempt


def parameter_groups(
    modules: Iterable[nn.Module], params: Iterable[nn.Parameter], *, weight_decay: float
) -> list[dict[str, Any]]:
    """`params` in two optimizer groups, in their order: with `weight_decay`, and without (see
    `no_decay`). An empty group is left out (a rank may hold only norms, say)."""
    exempt = no_decay(modules)
    decay: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for param in params:
        (other if id(param) in exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def lr_factor(
    schedule: str, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> Callable[[int], float]:
    """The multiplier of the peak lr at (0-based) step `step`, for `torch.optim.lr_scheduler.LambdaLR`."""
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"optimizer.lr_schedule={schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if schedule == "cosine":
            return min_ratio + (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return 1.0 - (1.0 - min_ratio) * progress

    return factor


def lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    lr: float,
    min_lr: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """`optimizer`'s learning rate per `lr_factor`: step it once after every optimizer step."""
    factor = lr_factor(schedule, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_lr / lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def accumulated_step(
    pipe: Pipeline, batches: Sequence[tuple[Any, Any]], adaptive: AdaptiveRunner | None = None
) -> float:
    """Run `pipe.step` on each batch and leave the mean of their gradients; returns the mean
    loss. Start from zeroed gradients (the mean scales whatever `.grad` held). Every batch
    should have the same rows, so the result is the gradient of one batch of all their rows.
    With `adaptive` (of `pipe`), each batch runs as its chooser says for that batch."""
    if not batches:
        raise ConfigError("accumulated_step: give at least one batch")
    run = pipe.step if adaptive is None else adaptive.step
    losses = [run(inputs, targets) for inputs, targets in batches]
    if len(batches) > 1:
        scale_gradients_(pipe.parameters(), 1.0 / len(batches))
    return sum(losses) / len(losses)


def apply_update(
    pipe: Pipeline, optimizer: torch.optim.Optimizer, scheduler: Any, clip: float | None, *,
    skipped: bool = False,
) -> float:
    """The update after a flush step, as `pipefold train` runs it: the gradient's norm over the
    whole model (clipped to `clip` where given; the same on every rank), the optimizer's step
    unless the batch was `skipped` (fp16 overflow), then the gradients cleared and the learning
    rate advanced. Returns the norm."""
    grad_norm = pipe.clip_grad_norm_(clip) if clip else pipe.gradient_scope().total_norm()
    if not skipped:
        with pipe.phase("optimizer step"):  # names it if a rank dies in it
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm
