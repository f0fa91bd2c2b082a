"""DeepSpeed's pipeline engine as an optional third column (1F1B only).

Install: `DS_BUILD_OPS=0 pip install deepspeed` (keep the torch you have). DeepSpeed
runs only its `TrainSchedule` (1F1B with a flush), and only through `train_batch`,
which also steps the optimizer and zeroes the gradients. So:

- the optimizer is plain SGD, with lr=0 while timing (the weights stay as they are;
  its update, a few element-wise ops, is inside DeepSpeed's step time);
- the gradient check runs one step with lr=1 and recovers the gradient as
  (weights before - weights after), then restores the weights.

Its default `gradient_clipping` (1.0) is switched off: the other sides do not clip.
DeepSpeed divides each micro-batch loss by the accumulation steps, so from the same
weights its update equals the batch-mean gradient of one process.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.harness.results import BenchConfig
from benchmarks.harness.workloads import Workload

__all__ = ["DeepSpeedSide"]


class DeepSpeedSide:
    label = "deepspeed"

    def __init__(self, engine: Any, optimizer: torch.optim.SGD, num_microbatches: int) -> None:
        self._engine = engine
        self._optimizer = optimizer
        self._num_microbatches = num_microbatches
        self._grads: dict[str, torch.Tensor] = {}

    @classmethod
    def create(
        cls, work: Workload, layers: list[nn.Module], config: BenchConfig, *, num_ranks: int
    ) -> tuple[DeepSpeedSide | None, str | None]:
        """The side for a 1F1B configuration; (None, None) for other schedules (not applicable)."""
        if config.schedule != "1f1b":
            return None, None
        if work.batch_size % config.num_microbatches:
            return None, (
                f"DeepSpeed needs the batch ({work.batch_size}) divisible by M={config.num_microbatches}"
            )
        # DeepSpeed reads its rank from the environment; the process group already exists.
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(num_ranks))
        # DeepSpeed is optional (not installed by default) and slow to import.
        import deepspeed  # type: ignore[import-not-found]
        from deepspeed.pipe import PipelineModule  # type: ignore[import-not-found]

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="gloo")
        module = PipelineModule(
            layers=copy.deepcopy(layers),
            loss_fn=work.loss_fn,
            num_stages=num_ranks,
            partition_method="uniform",
        )
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.0)
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            config={
                "train_batch_size": work.batch_size,
                "train_micro_batch_size_per_gpu": work.batch_size // config.num_microbatches,
                "gradient_accumulation_steps": config.num_microbatches,
                "steps_per_print": 10**9,
                # DeepSpeed clips the gradient norm to 1.0 unless told otherwise; pipefold
                # and torch do not clip, and a clipped step is not the one-process gradient
                # (docs/decisions.md, "DeepSpeed runs without gradient clipping").
                "gradient_clipping": 0.0,
                "wall_clock_breakdown": False,
            },
        )
        return cls(engine, optimizer, config.num_microbatches), None

    def _batches(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pieces = zip(inputs.chunk(self._num_microbatches), targets.chunk(self._num_microbatches), strict=True)
        return iter(list(pieces))

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self._engine.train_batch(self._batches(inputs, targets))

    def gradients(self) -> dict[str, torch.Tensor]:
        """Gradients of the last `check_step` (train_batch zeroes `.grad` itself)."""
        return self._grads

    def check_step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """One step with lr=1 that records the gradient as the weight change, then undoes it."""
        named = dict(self._engine.module.named_parameters())
        before = {name: p.detach().clone() for name, p in named.items()}
        for group in self._optimizer.param_groups:
            group["lr"] = 1.0
        try:
            self.step(inputs, targets)
        finally:
            for group in self._optimizer.param_groups:
                group["lr"] = 0.0
        with torch.no_grad():
            self._grads = {name: before[name] - p.detach() for name, p in named.items()}
            for name, p in named.items():
                p.copy_(before[name])

    def zero_grad(self) -> None:
        self._engine.module.zero_grad()

    def activation_bytes_peak(self) -> int | None:
        return None

    def timeline_json(self) -> dict[str, Any] | None:
        return None
