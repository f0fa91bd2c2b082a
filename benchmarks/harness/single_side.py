"""The efficiency baseline as a third side: one process, 1 thread, the same micro-batching.

This side runs the same accumulation as the parent's baseline, on rank 0 inside the
alternation (pipefold, torch, one process, pipefold, ...) while the other ranks wait at the
window's closing barrier, so the baseline sees the machine the pipelines see rather than
the machine of minutes before (docs/decisions.md, "The efficiency baseline is timed inside
the alternation"). The other ranks do no work during its window.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from benchmarks.harness.workloads import Workload

__all__ = ["SingleProcessSide"]


class SingleProcessSide:
    label = "one-process"

    def __init__(
        self, workload: Workload, layers: list[nn.Module], *, rank: int, num_microbatches: int
    ) -> None:
        self._workload = workload
        self._rank = rank
        self._num_microbatches = num_microbatches
        # Only rank 0 works; the others keep no copy of the model.
        self._model = nn.Sequential(*copy.deepcopy(layers)) if rank == 0 else None

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self._model is None:
            return
        batch_size = inputs.shape[0]
        pieces = zip(
            inputs.tensor_split(self._num_microbatches),
            targets.tensor_split(self._num_microbatches),
            strict=True,
        )
        for x, y in pieces:
            torch.autograd.backward(self._workload.loss_fn(self._model(x), y) * (x.shape[0] / batch_size))

    def gradients(self) -> dict[str, torch.Tensor]:
        if self._model is None:
            return {}
        return {name: p.grad for name, p in self._model.named_parameters() if p.grad is not None}

    def zero_grad(self) -> None:
        if self._model is not None:
            self._model.zero_grad(set_to_none=True)

    def activation_bytes_peak(self) -> int | None:
        return None

    def timeline_json(self) -> dict[str, Any] | None:
        return None
