"""The option groups `Pipeline` takes besides the model, the loss and the schedule.

    pipe = Pipeline(
        layers, loss_fn=F.cross_entropy, schedule="1f1b", num_microbatches=8,
        layout=LayoutOptions(partition=[3, 5], recompute="full", seed=7),
        parallel=ParallelOptions(process_group=mesh),
        runtime=RuntimeOptions(timeout_s=120, on_nonfinite="skip"),
        transport=TransportOptions(shared_memory=False),
    )

Each group is a frozen dataclass whose defaults are the pipeline's, and each checks its own
values when built (a `ConfigError` naming the field), so a bad option is refused before a
`Pipeline` is even constructed. Leave a group out to take all of its defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import Partition
from pipefold.runtime.parallel.tensor_parallel import TensorParallelPlan

__all__ = [
    "PURE_PRECISIONS",
    "LayoutOptions",
    "OptimizerFactory",
    "ParallelOptions",
    "RuntimeOptions",
    "TransportOptions",
]

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-pure")
"""What `RuntimeOptions.precision` may be."""

COMPUTE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16-pure": torch.bfloat16,
}
"""The autocast dtype of each precision (None: no autocast)."""

SHARD_MODES = ("replicate", "full")
"""What `ParallelOptions.shard` may be."""

PURE_PRECISIONS = ("bf16-pure",)
"""Precisions whose stages hold their weights (and gradients) in the compute dtype; the fp32
master copies live in the optimizer (`pipefold.runtime.master.fp32_master_weights`)."""

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class LayoutOptions:
    """Which layers each stage holds, how they are built and where they live.

    - `partition`: anything `pipefold.model.partition` accepts (a method name, per-stage
      layer counts, or a `Partition`).
    - `recompute`: "none", "full", "selective" (only the attention core of each transformer
      block: QK^T, softmax, attention over V; the built-in GPT), or the layer indices whose
      activations are recomputed in the backward instead of kept.
    - `device`: default `cuda:<LOCAL_RANK>` when CUDA is available, else cpu; the group's
      backend must match (nccl for CUDA, gloo for CPU).
    - `seed`: the weights of `LayerSpec` layers (see pipefold.model.materialize).
    """

    partition: str | Sequence[int] | Partition = "uniform"
    recompute: str | Sequence[int] = "none"
    device: torch.device | str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"LayoutOptions.seed = {self.seed!r}; give an integer")


@dataclass(frozen=True)
class ParallelOptions:
    """The ranks the pipeline runs on, the other parallel dimensions, and the optimizer of an
    asynchronous schedule (which steps each stage's weights inside the step, on its rank).

    - `process_group`: default the world (or a single process when torch.distributed is not
      initialized); a `DeviceMesh` contributes its "pp" dimension and, if it has them, its
      "dp" dimension (replicas, each on its own local batch: shard the global batch by
      `pipe.data_parallel_rank` / `pipe.num_data_parallel`; gradients averaged after each
      step) and its "tp" dimension (each layer split by `tensor_parallel`).
    - `data_parallel_group`: the "dp" ranks without a mesh: the ranks that hold this rank's
      stages in the other replicas (with `process_group` the pipeline's own group).
    - `tensor_parallel`: with a mesh that has a "tp" dim, how to split each layer over it: a
      mapping {submodule name pattern: ParallelStyle} (torch's `parallelize_module` plan)
      applied to every layer with such submodules, or a function (layer index, module) ->
      such a mapping or None. Each layer must map a replicated input to a replicated output.
      Flush schedules only; tied layers and shared parameters stay whole
      (docs/decisions.md, "tensor parallel x pipeline").
    - `optimizer`: a factory `lambda params: torch.optim.X(params, ...)`, required by
      asynchronous schedules (pipedream, pipedream-2bw) and refused by flush ones.
    - `shard`: "replicate" (every replica holds its stages whole) or "full": each stage's
      weights, gradients (and so an optimizer's state) are sharded over the "dp" replicas with
      FSDP2, gathered once per step before the stage's first forward and freed after its last
      backward (docs/parallelism.md, "Full sharding"). The schedule holds these as UNSHARD /
      REDUCE_GRAD / RESHARD actions (`pipefold.schedule.add_sharding`). ZeRO-1 (only the
      optimizer state sharded) is `sharded_optimizer`, not an option here.
    - `free_between_microbatches` (full sharding): free a stage's whole weights whenever its
      rank turns to another of its stages (interleaved, V), and gather them again before the
      stage's next action: at most one stage's whole weights per rank, more gathers per step.
    - `gather_lookahead` (full sharding): start each gather this many actions of the rank's
      program before the action that needs it, so it overlaps that compute (0: right before).
    - `overlap_reduction`: with replicated data parallelism, start each stage's gradient
      all-reduce as soon as its last backward action (B or W) of the step is done, so it runs
      while the rank's other stages and the pipeline's drain still compute; False all-reduces
      every gradient after the schedule.
    """

    process_group: Any = None
    data_parallel_group: Any = None
    tensor_parallel: TensorParallelPlan | None = None
    optimizer: OptimizerFactory | None = None
    shard: Literal["replicate", "full"] = "replicate"
    overlap_reduction: bool = True
    free_between_microbatches: bool = False
    gather_lookahead: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.free_between_microbatches, bool):
            raise ConfigError(
                f"ParallelOptions.free_between_microbatches = {self.free_between_microbatches!r}; "
                "use True or False"
            )
        lookahead = self.gather_lookahead
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ConfigError(
                f"ParallelOptions.gather_lookahead = {lookahead!r}; give an integer >= 0 (actions "
                "before its first use a stage's weight gather starts)"
            )
        if self.shard != "full" and (self.free_between_microbatches or lookahead):
            raise ConfigError(
                "ParallelOptions.free_between_microbatches and gather_lookahead place full sharding's "
                f"gathers, but shard={self.shard!r}; set shard='full' or leave them at their defaults"
            )
        if not isinstance(self.overlap_reduction, bool):
            raise ConfigError(
                f"ParallelOptions.overlap_reduction = {self.overlap_reduction!r}; use True or False"
            )
        shard: str = self.shard
        if shard not in SHARD_MODES:
            hint = (
                "; ZeRO-1 shards the optimizer only: keep shard='replicate' and wrap the optimizer "
                "with pipefold.runtime.sharded_optimizer"
                if shard == "zero1"
                else ""
            )
            raise ConfigError(
                f"ParallelOptions.shard = {self.shard!r}; use one of {', '.join(SHARD_MODES)}{hint}"
            )
        if self.optimizer is not None and not callable(self.optimizer):
            raise ConfigError(
                f"ParallelOptions.optimizer = {self.optimizer!r}; pass a factory "
                "lambda params: torch.optim.SGD(params, lr=...)"
            )


@dataclass(frozen=True)
class RuntimeOptions:
    """How a rank waits, what it records, and how it runs the schedule's backward.

    - `timeout_s`: the longest any wait for another rank may last.
    - `on_nonfinite`: "raise" (NonFiniteLoss on every rank) or "skip" (the step's gradient
      contribution is dropped on every rank).
    - `record_timeline`: gather `last_timeline` after each step and count activation bytes.
    - `count_memory_every`: count activation bytes (saved-tensor hooks) on the first step of
      each new batch shape and then every this many steps; other steps report the last count.
      1 counts every step. Counting costs a Python call per saved tensor.
    - `fuse_backward`: run an I directly followed by its W as one B where no other rank waits
      for I's gradient (the first stage, or a predecessor on the same rank); `pipe.schedule`
      is then the fused schedule. False runs the schedule as given.
    - `keep_cpu_heap`: on CPU, tell glibc to keep freed memory for reuse instead of returning
      it to the kernel between micro-batches (process-wide; see
      pipefold/runtime/processes/allocator.py): fewer page faults, a flat heap at its peak.
    - `busy_wait`: whether a rank waiting for a shared-memory message keeps checking for it
      without sleeping (up to 50 ms, then it sleeps in short pauses); None decides by the
      cores: on CPU where every rank of the pipeline has a core of its own, never where ranks
      share cores (docs/decisions.md, "busy polling"). False leaves idle cores idle, at the
      cost of a slower wake-up.
    - `precision`: "fp32", "bf16" or "fp16": each stage's forward runs under `torch.autocast`
      in that dtype with fp32 weights, gradients and optimizer state; floating boundary tensors
      (and their gradients) travel in it, half the bytes; the last stage hands the loss
      function its output in fp32 (docs/training.md, "Mixed precision"). "bf16-pure" also holds
      the stages' floating weights, buffers and gradients in bf16: step them with an optimizer
      that keeps fp32 master copies and fp32 state (`fp32_master_weights(torch.optim.AdamW)`);
      replicas all-reduce its gradients in fp32; with ZeRO-1 shard that optimizer
      (`sharded_optimizer`); with full sharding each rank keeps the masters of its shards;
      asynchronous schedules take such an optimizer as their factory's
      (`ParallelOptions(optimizer=lambda ps: fp32_master_weights(torch.optim.SGD)(ps, lr=0.1))`)
      and sum each update's gradients over replicas and tied owners in fp32.
    - `loss_scale`: fp16's initial dynamic loss scale (e.g. 2.0**16), required by fp16 and
      refused by the others; see pipefold/runtime/loss_scale.py (`pipe.loss_scale.skipped`).
    - `loss_scale_growth_interval`: clean steps after which the scale doubles.
    - `compile`: run each layer of each stage through `torch.compile` (inductor). The
      weights, their names and the results stay those of the eager layers (within float
      rounding); the split backward of zero-bubble schedules still runs I and W separately
      (docs/training.md, "torch.compile per layer"). Refused where there is no C++ compiler.
    """

    timeout_s: float = 60.0
    on_nonfinite: Literal["raise", "skip"] = "raise"
    record_timeline: bool = True
    count_memory_every: int = 8
    fuse_backward: bool = True
    keep_cpu_heap: bool = True
    busy_wait: bool | None = None
    precision: Literal["fp32", "bf16", "fp16", "bf16-pure"] = "fp32"
    loss_scale: float | None = None
    loss_scale_growth_interval: int = 2000
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool):
            raise ConfigError(f"RuntimeOptions.compile = {self.compile!r}; use True or False")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"RuntimeOptions.precision = {self.precision!r}; use one of {', '.join(PRECISIONS)}"
            )
        scale = self.loss_scale
        if self.precision == "fp16":
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
                raise ConfigError(
                    f"RuntimeOptions.loss_scale = {scale!r} with precision='fp16'; fp16 gradients "
                    "underflow without a loss scale: give the initial dynamic scale, e.g. loss_scale=2.0**16"
                )
        elif scale is not None:
            raise ConfigError(
                f"RuntimeOptions.loss_scale = {scale!r} with precision={self.precision!r}; only fp16 "
                "needs a loss scale: leave it None, or use precision='fp16'"
            )
        interval = self.loss_scale_growth_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(
                f"RuntimeOptions.loss_scale_growth_interval = {interval!r}; give a positive number of steps"
            )
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"RuntimeOptions.timeout_s = {timeout!r}; give a positive number of seconds")
        if self.on_nonfinite not in ("raise", "skip"):
            raise ConfigError(
                f"RuntimeOptions.on_nonfinite = {self.on_nonfinite!r}; use 'raise' or 'skip'"
            )
        every = self.count_memory_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(
                f"RuntimeOptions.count_memory_every = {every!r}; "
                "give a positive number of steps (1 = every step)"
            )
        if self.busy_wait is not None and not isinstance(self.busy_wait, bool):
            raise ConfigError(
                f"RuntimeOptions.busy_wait = {self.busy_wait!r}; "
                "use True, False or None (decide by the cores)"
            )


@dataclass(frozen=True)
class TransportOptions:
    """How boundary tensors travel between the pipeline's ranks.

    - `shared_memory`: on CPU, ranks on one host exchange boundary tensors through /dev/shm
      (about 10x lower latency than gloo's loopback sockets; see
      pipefold/runtime/transport/shm.py); False sends everything through the process group.
    - `shared_memory_bytes`: the most one step may send to one peer that way (pages are
      allocated as steps need them); a step with more uses the process group. 0 is the same
      as `shared_memory=False`.
    """

    shared_memory: bool = True
    shared_memory_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        size = self.shared_memory_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(
                f"TransportOptions.shared_memory_bytes = {size!r}; give a byte count >= 0 "
                "(the most one step may send to one peer through shared memory)"
            )
