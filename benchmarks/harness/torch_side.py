"""The torch.distributed.pipelining side of a benchmark pair.

torch's `step()` is called differently per rank: the first stage's rank
passes the inputs, the last stage's rank passes the targets and a `losses` list (under
V placement rank 0 holds both). Its loss runs per micro-batch unscaled and
`scale_grads=True` divides the gradients by the number of micro-batches at the end of
`step`, which from zeroed gradients gives the batch-mean gradient.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed import pipelining

from benchmarks.harness.layout import stage_bounds
from benchmarks.harness.pairs import SchedulePair
from benchmarks.harness.sides import global_name
from benchmarks.harness.workloads import Workload

__all__ = ["TorchSide"]


class TorchSide:
    label = "torch"

    def __init__(
        self,
        workload: Workload,
        layers: list[nn.Module],
        schedule_pair: SchedulePair,
        *,
        rank: int,
        num_ranks: int,
        num_microbatches: int,
    ) -> None:
        placement = schedule_pair.placement(num_ranks)
        num_stages = len(placement)
        bounds = stage_bounds(num_stages)
        self._owned = schedule_pair.stages_of(rank, num_ranks)
        self._first_layers: list[int] = []
        self._modules: list[nn.Module] = []
        stages = []
        for stage in self._owned:
            start, stop = bounds[stage]
            module = nn.Sequential(*copy.deepcopy(layers[start:stop]))
            self._modules.append(module)
            self._first_layers.append(start)
            stages.append(pipelining.PipelineStage(module, stage, num_stages, torch.device("cpu")))
        if schedule_pair.torch_class is None:
            raise ValueError(f"{schedule_pair.schedule} has no torch.distributed.pipelining counterpart")
        schedule_class = getattr(pipelining, schedule_pair.torch_class)
        self._holds_first = 0 in self._owned
        self._holds_last = num_stages - 1 in self._owned
        if schedule_pair.torch_class in ("ScheduleGPipe", "Schedule1F1B"):
            self._schedule = schedule_class(stages[0], num_microbatches, loss_fn=workload.loss_fn)
        else:
            self._schedule = schedule_class(stages, num_microbatches, loss_fn=workload.loss_fn)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        args = (inputs,) if self._holds_first else ()
        if self._holds_last:
            losses: list[torch.Tensor] = []
            self._schedule.step(*args, target=targets, losses=losses, return_outputs=False)
        else:
            self._schedule.step(*args, return_outputs=False)

    def gradients(self) -> dict[str, torch.Tensor]:
        grads = {}
        for first_layer, module in zip(self._first_layers, self._modules, strict=True):
            for name, parameter in module.named_parameters():
                if parameter.grad is not None:
                    grads[global_name(first_layer, name)] = parameter.grad
        return grads

    def zero_grad(self) -> None:
        for module in self._modules:
            module.zero_grad()

    def activation_bytes_peak(self) -> int | None:
        return None

    def timeline_json(self) -> dict[str, Any] | None:
        return None
