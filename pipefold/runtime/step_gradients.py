"""What one step does to `.grad` around the executor: before it, set aside what the gradients
held (a copy to restore where non-finite losses are skipped, or data parallelism's or fp16's
loss-scale set-aside); after the ranks agree on the losses, either drop the step's contribution
(a skipped non-finite step or an fp16 overflow) or keep it (tied gradients summed, replicas
averaged, the loss scale divided out). Also builds fp16's `DynamicLossScale` for a pipeline."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipefold.runtime.failure import Watchdog
from pipefold.runtime.loss_scale import DynamicLossScale
from pipefold.runtime.options import RuntimeOptions
from pipefold.runtime.parallel.data_parallel import DataParallel
from pipefold.runtime.parallel.dims import ParallelDims
from pipefold.runtime.tied import TiedGradients, grad_copy

__all__ = ["StepGradients", "new_loss_scale"]

logger = logging.getLogger(__name__)


def new_loss_scale(
    options: RuntimeOptions, dims: ParallelDims, watchdog: Watchdog
) -> DynamicLossScale | None:
    """fp16's dynamic loss scale, agreed over every rank of the job; None in fp32 and bf16."""
    if options.loss_scale is None:
        return None
    # One agreement over every rank of the job: with replicas or tp peers that is the world
    # (the mesh); a lone pipeline agrees within its own group.
    spans_more = dims.data_parallel_group is not None or dims.tensor_parallel_group is not None
    group = dist.group.WORLD if spans_more else dims.pipeline_group
    return DynamicLossScale(
        options.loss_scale,
        growth_interval=options.loss_scale_growth_interval,
        group=group,
        watchdog=watchdog,
    )


class StepGradients:
    """One step's gradient bookkeeping: built (setting the gradients aside) before the executor
    runs, `finish`ed once the losses are agreed on every rank."""

    def __init__(
        self,
        parameters: Callable[[], Iterable[nn.Parameter]],
        tied: TiedGradients,
        data_parallel: DataParallel | None,
        scaler: DynamicLossScale | None,
        *,
        skip: bool,
    ) -> None:
        self._tied = tied
        self._data_parallel = data_parallel
        self._scaler = scaler
        self._skip = skip
        self._params = list(parameters()) if scaler is not None else []
        # With data parallelism (or a loss scale) the set-aside gradients are the snapshot (no copy).
        self._restore: list[tuple[nn.Parameter, Tensor | None]] = (
            [(p, grad_copy(p)) for p in parameters()]
            if skip and data_parallel is None and scaler is None
            else []
        )
        if data_parallel is not None:
            data_parallel.set_aside_gradients()
        elif scaler is not None:
            scaler.set_aside(self._params)
        self._tied_before = tied.snapshot()

    def finish(self, losses: Tensor, weight: float, device: torch.device) -> list[int]:
        """Keep or drop the step's contribution; returns the micro-batches whose loss is not finite."""
        data_parallel, scaler, params = self._data_parallel, self._scaler, self._params
        bad = [mb for mb, finite in enumerate(torch.isfinite(losses).tolist()) if not finite]
        overflow = scaler is not None and scaler.overflowed(params, device)
        if (bad and self._skip) or overflow:
            for param, grad in self._restore:
                param.grad = grad
            if data_parallel is not None:
                data_parallel.restore_set_aside()
            elif scaler is not None:
                scaler.restore(params)
            if bad:
                logger.warning("non-finite loss in micro-batches %s: this step's gradients were skipped", bad)
        else:
            weight = weight if scaler is None else weight / scaler.scale
            if data_parallel is not None and data_parallel.in_flight:
                # Overlapped: the replicas' sums of this step's gradients (each stage's started
                # after its last backward) land first, then the tied owners sum those; both
                # are sums, so the order does not change the result.
                data_parallel.reduce_gradients(weight)
                self._tied.sum(self._tied_before)
                data_parallel.add_back_set_aside()
            elif data_parallel is not None:
                self._tied.sum(self._tied_before)
                data_parallel.average_gradients(weight)
            else:
                self._tied.sum(self._tied_before)
                if scaler is not None:
                    scaler.unscale_and_add_back(params)
        if scaler is not None:
            scaler.update(overflow)
        return bad
