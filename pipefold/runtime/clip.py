"""The global gradient norm of a pipelined model, and clipping by it (`Pipeline.clip_grad_norm_`).

    loss = pipe.step(inputs, targets)
    norm = pipe.clip_grad_norm_(1.0)     # on every rank; the same float everywhere
    optimizer.step(); optimizer.zero_grad()

The norm is the one `torch.nn.utils.clip_grad_norm_` gives the unsplit model in one process:
every gradient entry of the model is counted exactly once. A rank counts its own stages'
parameters, except a tied module's copy on any owner but the first (the owners hold the same
summed gradient), a tensor-parallel parameter's replicated whole on any tp rank but the first,
and nothing twice for data-parallel replicas (after `step` they hold the same averaged
gradient, so each computes the same norm on its own). Partial sums (or maxima, for the
inf-norm) are combined in float64, first over the tp peers, then over the pipeline's ranks in
rank order, so every rank gets the same bits. Every gradient is then scaled by torch's
factor `min(1, max_norm / (norm + 1e-6))`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from pipefold.errors import ConfigError, NonFiniteLoss
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.transport.comm import Collectives

__all__ = ["GradientScope", "check_clip_arguments", "not_counted", "scale_gradients_"]

_EPS = 1e-6
"""What torch.nn.utils.clip_grad_norm_ adds to the norm before dividing by it."""


def check_clip_arguments(max_norm: float, norm_type: float) -> None:
    """Refuse a non-positive `max_norm` and a `norm_type` that is no norm (p < 1 or NaN)."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ConfigError(
            f"clip_grad_norm_: max_norm = {max_norm!r}; give a positive number (e.g. 1.0), or do not clip"
        )
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type >= 1:
        raise ConfigError(
            f"clip_grad_norm_: norm_type = {norm_type!r}; give p >= 1 (2.0 for the Euclidean norm) "
            "or float('inf') for the largest entry"
        )


@dataclass(frozen=True)
class GradientScope:
    """The gradients one rank counts toward the model's norm, and how ranks combine theirs.

    - `params`: every local parameter (all are clipped).
    - `not_counted`: ids of parameters another rank counts (tied copies of later owners).
    - `tp_group` / `tp_rank`: this stage's tensor-parallel peers (None without tp).
    - `collectives`: the pipeline group's (None in one process).
    - `shard_group`: the replicas each gradient is split over (full sharding), else None.
    """

    params: tuple[nn.Parameter, ...]
    not_counted: frozenset[int]
    tp_group: dist.ProcessGroup | None
    tp_rank: int
    collectives: Collectives | None
    watchdog: Watchdog
    shard_group: dist.ProcessGroup | None = None

    def total_norm(self, norm_type: float = 2.0) -> float:
        """The model's gradient norm (float64 arithmetic), the same on every rank."""
        is_inf = math.isinf(norm_type)
        partial = torch.zeros(1, dtype=torch.float64)
        device: torch.device | None = None
        for param in self.params:
            grad = param.grad
            if grad is None:
                continue
            device = grad.device
            counted = self._counted_part(param, grad)
            if counted is None or counted.numel() == 0:
                continue
            values = counted.detach().to(torch.float64).abs()
            part = values.max() if is_inf else values.pow(norm_type).sum()
            partial = torch.maximum(partial, part.cpu()) if is_inf else partial + part.cpu()
        if device is None:
            device = next((p.device for p in self.params), torch.device("cpu"))
        partial = partial.to(device)
        if self.tp_group is not None:
            work = dist.all_reduce(
                partial,
                op=dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM,
                group=self.tp_group,
                async_op=True,
            )
            self.watchdog.wait(work, what="tensor-parallel gradient-norm all-reduce", peer=None)
        if self.shard_group is not None:  # each replica holds 1/dp of every gradient
            work = dist.all_reduce(
                partial,
                op=dist.ReduceOp.MAX if is_inf else dist.ReduceOp.SUM,
                group=self.shard_group,
                async_op=True,
            )
            self.watchdog.wait(work, what="sharded gradient-norm all-reduce", peer=None)
        if self.collectives is not None:
            parts = self.collectives.all_gather(partial, what="gradient-norm all-gather")
            # Combined in pipeline-rank order on every rank: the same bits everywhere.
            combined = parts[0].clone()
            for other in parts[1:]:
                combined = torch.maximum(combined, other) if is_inf else combined + other
            partial = combined
        total = float(partial.item())
        return total if is_inf else total ** (1.0 / norm_type)

    def _counted_part(self, param: nn.Parameter, grad: Tensor) -> Tensor | None:
        """What of `grad` this rank counts: the local shard of a DTensor split over "tp" (and,
        fully sharded, over "dp"), the local part of one replicated over "tp" on tp rank 0 only,
        nothing for a tied copy another rank counts."""
        if id(param) in self.not_counted:
            return None
        if isinstance(grad, DTensor):
            placements = grad.placements
            if any(p.is_partial() for p in placements):
                # Each tp rank holds a summand: the norm needs the sum (a collective every tp
                # peer makes here, for the same parameter, in the same order).
                full = grad.full_tensor()
                return full if self.tp_rank == 0 else None
            # Split over "tp": each tp rank counts its part. Otherwise (replicated over "tp", or a
            # tensor full sharding splits over "dp" only) every tp peer holds the same values.
            names = tuple(grad.device_mesh.mesh_dim_names or ())
            split_over_tp = "tp" in names and placements[names.index("tp")].is_shard()
            if not split_over_tp and "tp" not in names and self.tp_group is None:
                return grad.to_local()  # no tensor parallelism: a "dp" shard or a whole tensor
            return grad.to_local() if split_over_tp or self.tp_rank == 0 else None
        if self.tp_group is not None and self.tp_rank != 0:
            return None  # a whole parameter: every tp peer holds the same gradient
        return grad

    def clip_(self, max_norm: float, norm_type: float = 2.0, *, error_if_nonfinite: bool = False) -> float:
        """Scale every gradient so the model's norm is at most `max_norm`; returns the norm
        before clipping (as torch.nn.utils.clip_grad_norm_ does)."""
        check_clip_arguments(max_norm, norm_type)
        total = self.total_norm(norm_type)
        if error_if_nonfinite and not math.isfinite(total):
            raise NonFiniteLoss(
                f"the total gradient norm (order {norm_type}) is {total}; every rank stops alike. "
                "Lower the learning rate, check the data, or pass error_if_nonfinite=False"
            )
        # torch computes the factor in the gradients' dtype from a tensor norm; so do we.
        norm = torch.tensor(total, dtype=torch.float32)
        factor = torch.clamp(max_norm / (norm + _EPS), max=1.0)
        scale_gradients_(self.params, factor)
        return total


def scale_gradients_(params: Iterable[nn.Parameter], factor: float | Tensor) -> None:
    """Multiply every gradient of `params` by `factor` in place (a DTensor's local shard)."""
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        target = grad.to_local() if isinstance(grad, DTensor) else grad
        scale = factor.to(device=target.device) if isinstance(factor, Tensor) else factor
        target.mul_(scale)


def not_counted(tied: Sequence[tuple[Sequence[int], Sequence[nn.Parameter]]], rank: int) -> frozenset[int]:
    """Ids of the tied parameters this rank holds but another owner (the first) counts."""
    return frozenset(id(p) for owners, params in tied if owners[0] != rank for p in params)
