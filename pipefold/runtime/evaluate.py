"""A forward-only pass through the pipeline: the loss of a batch without backward or update
(`Pipeline.evaluate`), so a model no single device holds is evaluated where it is trained.

    val_loss = pipe.evaluate(inputs, targets)     # on every rank, like step(); no gradients

Every rank walks the (micro-batch, stage) pairs in the same order, micro-batch first, and
runs the stages it holds under `torch.no_grad()` (under mixed precision with the training
step's autocast and 16-bit boundaries, `Stage.forward_only`): a stage's input comes from the batch
(stage 0), from the previous stage on this rank, or from the rank that holds it (received
through the process group); its output goes on the same way. Sends are asynchronous, so the
micro-batches flow through the ranks as in GPipe's forward phase, and no activation outlives
its stage. The smallest unfinished pair is always runnable on its rank, so the walk cannot
deadlock. The last stage's losses (each micro-batch's mean weighted by its share of the rows)
are summed over the pipeline's ranks and then over data-parallel replicas, so every rank
returns the mean loss over all replicas' rows, as `step` does. Tensor-parallel peers walk
together (their layers' collectives pair up as in training).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipefold.model import TensorMeta
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.parallel.data_parallel import DataParallel
from pipefold.runtime.stage import Stage, flatten
from pipefold.runtime.step_batch import split_batch
from pipefold.runtime.transport.comm import P2P, Collectives, Transfer
from pipefold.schedule import Schedule

__all__ = ["ForwardOnly"]


@dataclass(frozen=True)
class ForwardOnly:
    """What a forward-only pass needs of a pipeline (`Pipeline.evaluate` builds it)."""

    schedule: Schedule
    rank: int
    stages: Mapping[int, Stage]
    loss_fn: Callable[[Any, Any], Tensor]
    boundaries: Callable[[TensorMeta, int], list[TensorMeta]]
    """(batch description, rows of a micro-batch) -> each layer's output description."""
    device: torch.device
    p2p: P2P | None
    collectives: Collectives | None
    data_parallel: DataParallel | None
    watchdog: Watchdog

    def run(self, inputs: Any, targets: Any) -> float:
        """The batch-mean loss over every replica's rows, on every rank (see the module docstring)."""
        schedule = self.schedule
        placement = schedule.placement
        batch = split_batch(
            self.rank, schedule, inputs, targets, self.collectives, self.device, caller="evaluate"
        )
        batch_size, sizes = batch.size, batch.sizes
        every_boundary = batch.boundaries(self.boundaries)
        split_inputs, split_targets = batch.inputs, batch.targets
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        sends: list[Transfer] = []
        with torch.no_grad():
            for mb, size in enumerate(sizes):
                boundaries = every_boundary[mb]
                handoff: Any = None
                for s in range(schedule.num_stages):
                    if placement[s] != self.rank:
                        continue
                    stage = self.stages[s]
                    if s == 0:
                        assert split_inputs is not None
                        value = split_inputs[mb]
                    elif placement[s - 1] == self.rank:
                        value = handoff
                    else:
                        value = self._receive(boundaries[stage.layer_indices[0] - 1], placement[s - 1], s, mb)
                    output = stage.forward_only(value)
                    if s == schedule.num_stages - 1:
                        assert split_targets is not None
                        loss = self.loss_fn(output, split_targets[mb])
                        total += loss.detach().to(torch.float64) * (size / batch_size)
                    elif placement[s + 1] == self.rank:
                        handoff = output
                    else:
                        assert self.p2p is not None
                        tensors = [tensor.detach().contiguous() for tensor in flatten(output)]
                        sends.append(self.p2p.send_direct(tensors, placement[s + 1]))
        for transfer in sends:
            transfer.wait(self.watchdog, "evaluate: forward send")
        if self.collectives is not None:
            self.collectives.all_reduce_sum(total, what="evaluate loss all-reduce")
        if self.data_parallel is not None:
            total, _ = self.data_parallel.reduce_losses(total, batch_size)
        return float(total.item())

    def _receive(self, meta: TensorMeta, peer: int, stage: int, microbatch: int) -> Any:
        assert self.p2p is not None
        value = meta.empty(self.device)
        self.p2p.recv_direct(list(flatten(value)), peer).wait(
            self.watchdog, f"evaluate: stage {stage} input of micro-batch {microbatch}"
        )
        self.p2p.after_recv()
        return value
