"""`Pipeline`: a model cut into stages, run under a schedule across the ranks of a group.

    pipe = Pipeline(layers, loss_fn=F.cross_entropy, schedule="1f1b", num_microbatches=8)
    for inputs, targets in data:                  # the same call on every rank
        loss = pipe.step(inputs, targets)         # batch-mean loss, on every rank
        optimizer.step(); optimizer.zero_grad()   # flush schedules: the user steps

One `step` is one global batch: the rank of stage 0 broadcasts the batch's shapes,
every rank traces the boundary shapes on the meta device (cached per shape), the
executor walks this rank's lowered program, and then the ranks agree on the loss,
sum the gradients of tied modules and (optionally) gather the measured timeline.

Design notes: docs/decisions.md, "exact gradients" and "changing the schedule".
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._C._distributed_c10d import Store

from pipefold.errors import ConfigError, NonFiniteLoss, PeerFailure, PipefoldError, PipelineError
from pipefold.model import (
    LayerLike,
    Partition,
    TensorMeta,
    as_layers,
    materialize,
    meta_layers,
    owner_indices,
    partition,
    tied_groups,
    trace_boundaries,
)
from pipefold.parallel_config import ParallelConfig
from pipefold.runtime import step_gather
from pipefold.runtime.executor import Executor, StepInputs
from pipefold.runtime.failure import BUSY_POLL_S, FailureBoard, FailureReport, Watchdog
from pipefold.runtime.memory import ActivationCounter
from pipefold.runtime.parallel.data_parallel import DataParallel, split_mesh
from pipefold.runtime.parallel.sequence_parallel import sequence_sharded_outputs, shard_boundaries
from pipefold.runtime.parallel.tensor_parallel import (
    TensorParallelPlan,
    apply_tensor_parallel,
    check_plan,
    plan_for,
    shard_like,
    tensor_parallel_mesh,
)
from pipefold.runtime.parallel.tensor_parallel import local as local_shard
from pipefold.runtime.processes.allocator import keep_freed_memory
from pipefold.runtime.processes.cores import processes_on_host, ranks_share_cores, shared_cores
from pipefold.runtime.recording import StepRecorder
from pipefold.runtime.stage import Stage
from pipefold.runtime.stash import WeightStash
from pipefold.runtime.tied import TiedGradients, grad_copy
from pipefold.runtime.transport.comm import P2P, Collectives
from pipefold.schedule import Op, Schedule, WeightUpdate, build, lower
from pipefold.schedule.lower import Program, fuse_adjacent_split_backward
from pipefold.schedule.validate import validate
from pipefold.timeline import Timeline

__all__ = ["Pipeline"]

logger = logging.getLogger(__name__)

DEFAULT_NUM_MICROBATCHES = 8
"""Micro-batches per step where neither the caller nor a ready `Schedule` says."""

LossFn = Callable[[Any, Any], Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Pipeline:
    """Pipeline-parallel execution of `layers` on the ranks of `process_group`.

    Every rank constructs the pipeline with the same arguments. All configuration is
    checked here, before any communication; see the module docstring for a step.

    - `layers`: an `nn.Sequential` or a list of modules / `LayerSpec`s (pipefold.model).
    - `loss_fn(output, target)`: the scalar mean over one micro-batch, on the last stage.
    - `schedule`: a family name (`pipefold.schedule.names()`) or a ready `Schedule`;
      `num_microbatches` (default 8) and `num_virtual` are passed to `build`.
    - `partition`: anything `pipefold.model.partition` accepts.
    - `recompute`: "none", "full", or the layer indices to checkpoint.
    - `device`: default `cuda:<LOCAL_RANK>` when CUDA is available, else cpu; the group's
      backend must match (nccl for CUDA, gloo for CPU).
    - `process_group`: default the world (or a single process when torch.distributed is
      not initialized); a `DeviceMesh` contributes its "pp" dimension and, if it has
      one, its "dp" dimension: replicas along "dp" run the same pipeline, each on its
      own local batch (shard the global batch by `data_parallel_rank` /
      `num_data_parallel`; all shards of one step should come from one global batch),
      and their gradients are averaged after each step. Only "dp" and "pp" exist.
    - `data_parallel_group`: the same without a mesh: the ranks that hold this rank's
      stages in the other replicas (with `process_group` the pipeline's own group).
    - `optimizer`: a factory `lambda params: torch.optim.X(params, ...)`, required by
      asynchronous schedules (pipedream, pipedream-2bw) and refused by flush ones.
    - `seed`: weights of `LayerSpec` layers (see pipefold.model.materialize).
    - `timeout_s`: the longest any wait for another rank may last.
    - `on_nonfinite`: "raise" (NonFiniteLoss on every rank) or "skip" (the step's
      gradient contribution is dropped on every rank).
    - `record_timeline`: gather `last_timeline` after each step and count activation bytes.
    - `count_memory_every`: count activation bytes (saved-tensor hooks) on the first step
      of each new batch shape and then every this many steps; other steps report the last
      count. 1 counts every step. Counting costs a Python call per saved tensor.
    - `fuse_backward`: run an I directly followed by its W as one B where no other rank
      waits for I's gradient (the first stage, or a predecessor on the same rank);
      `pipe.schedule` is then the fused schedule. False runs the schedule as given.
    - `shared_memory`: on CPU, ranks on one host exchange boundary tensors through
      /dev/shm (about 10x lower latency than gloo's loopback sockets; see
      pipefold/runtime/transport/shm.py); False sends everything through the process group.
      `shared_memory_bytes` is the most one step may send to one peer that way (pages
      are allocated as steps need them); a step with more uses the process group.
    - `busy_wait`: whether a rank waiting for a shared-memory message keeps checking for
      it without sleeping (up to 50 ms, then it sleeps in short pauses); None (default)
      does so on CPU where every rank of the pipeline has a core of its own, never where
      ranks share cores (docs/decisions.md, "busy polling"). False
      leaves idle cores idle, at the cost of a slower wake-up.
    - `tensor_parallel`: with a `DeviceMesh` that has a "tp" dim, how to split each layer
      over it: a mapping {submodule name pattern: ParallelStyle} (torch's
      `parallelize_module` plan, e.g. {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
      applied to every layer with such submodules, or a function (layer index, module) ->
      such a mapping or None. Each layer must map a replicated input to a replicated
      output. A ("dp", "pp", "tp") mesh composes all three. Flush schedules only; tied
      layers stay whole (docs/decisions.md, "tensor parallel x pipeline").
    - `keep_cpu_heap`: on CPU, tell glibc to keep freed memory for reuse instead of
      returning it to the kernel between micro-batches (process-wide; see
      pipefold/runtime/processes/allocator.py): fewer page faults, a flat heap at its peak.
    """

    _num_created: ClassVar[itertools.count[int]] = itertools.count()

    def __init__(
        self,
        layers: nn.Sequential | Sequence[LayerLike],
        *,
        loss_fn: LossFn,
        schedule: str | Schedule = "1f1b",
        num_microbatches: int | None = None,
        num_virtual: int | None = None,
        partition: str | Sequence[int] | Partition = "uniform",
        recompute: str | Sequence[int] = "none",
        device: torch.device | str | None = None,
        process_group: Any = None,
        data_parallel_group: Any = None,
        optimizer: OptimizerFactory | None = None,
        seed: int = 0,
        timeout_s: float = 60.0,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        record_timeline: bool = True,
        fuse_backward: bool = True,
        count_memory_every: int = 8,
        shared_memory: bool = True,
        shared_memory_bytes: int = 64 << 20,
        keep_cpu_heap: bool = True,
        busy_wait: bool | None = None,
        tensor_parallel: TensorParallelPlan | None = None,
    ) -> None:
        self._layers = as_layers(layers)
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable (output, target) -> scalar tensor, got {loss_fn!r}")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ConfigError(f"timeout_s = {timeout_s!r}; give a positive number of seconds")
        if on_nonfinite not in ("raise", "skip"):
            raise ConfigError(f"on_nonfinite = {on_nonfinite!r}; use 'raise' or 'skip'")
        self._loss_fn = loss_fn
        self._timeout_s = float(timeout_s)
        self._on_nonfinite = on_nonfinite
        self._record_timeline = record_timeline
        if not isinstance(count_memory_every, int) or count_memory_every < 1:
            raise ConfigError(
                f"count_memory_every = {count_memory_every!r}; "
                "give a positive number of steps (1 = every step)"
            )
        self._count_memory_every = count_memory_every
        if not isinstance(shared_memory_bytes, int) or shared_memory_bytes < 0:
            raise ConfigError(
                f"shared_memory_bytes = {shared_memory_bytes!r}; give a byte count >= 0 "
                f"(the most one step may send to one peer through shared memory)"
            )
        if busy_wait is not None and not isinstance(busy_wait, bool):
            raise ConfigError(f"busy_wait = {busy_wait!r}; use True, False or None (decide by the cores)")
        self._num_steps_run = 0
        self._memory_counted_for: set[TensorMeta] = set()
        self._activation_peak = 0

        check_plan(tensor_parallel, process_group)
        pipeline_group, data_parallel_group = split_mesh(process_group, data_parallel_group)
        tp_mesh = tensor_parallel_mesh(process_group)
        self._group, self._ranks = resolve_group(pipeline_group)
        num_ranks = len(self._ranks)
        self.rank = 0 if self._group is None else dist.get_rank(self._group)
        if data_parallel_group is not None and dist.get_world_size(data_parallel_group) == 1:
            data_parallel_group = None
        # The rulebook first with what is known before the schedule is built, then with it.
        described = ParallelConfig(
            pp=num_ranks,
            dp=1 if data_parallel_group is None else dist.get_world_size(data_parallel_group),
            tp=1 if tp_mesh is None else int(tp_mesh.size()),
            num_microbatches=_num_microbatches(schedule, num_microbatches),
            num_virtual=num_virtual,
            schedule=schedule.name if isinstance(schedule, Schedule) else str(schedule),
            recompute=recompute if isinstance(recompute, str) else tuple(recompute),
            on_nonfinite=on_nonfinite,
            tied_layers=bool(tied_groups(self._layers)),
            num_layers=len(self._layers),
        )
        described.check()
        self.schedule = _resolve_schedule(schedule, num_ranks, num_microbatches, num_virtual)
        self.parallel_config = replace(
            described,
            num_virtual=self.schedule.num_virtual,
            schedule=self.schedule.name,
            weight_update=str(self.schedule.weight_update),
        )
        """This pipeline's configuration as the rulebook (`pipefold.parallel_config`) checked it."""
        self.parallel_config.check()
        self._fuse_backward = fuse_backward
        if fuse_backward:
            # Adjacent I/W pairs whose early input gradient nobody waits for run as one B:
            # same result, cheaper (see fuse_adjacent_split_backward). `self.schedule` is
            # what runs, so the measured timeline and a simulation of it line up.
            self.schedule = fuse_adjacent_split_backward(self.schedule)
        self._check_optimizer(optimizer)
        self._tensor_parallel_group: dist.ProcessGroup | None = (
            None if tp_mesh is None else tp_mesh.get_group()
        )
        self._meta = meta_layers(self._layers)
        # Layer outputs a tp rank holds split along the sequence (docs/decisions.md, "sequence
        # parallel x pipeline"): the boundaries after them carry 1/tp of the traced shape.
        self._sequence_sharded: dict[int, int] = {}
        if tensor_parallel is not None:
            self._check_tied_layers_whole(tensor_parallel)
            self._sequence_sharded = sequence_sharded_outputs(tensor_parallel, self._meta)
        self.device = _resolve_device(device, self._group)
        if data_parallel_group is not None:
            _resolve_device(self.device, data_parallel_group)  # its backend must match the device too
        if keep_cpu_heap and self.device.type == "cpu":
            keep_freed_memory()
        recompute_all, recompute_layers = _resolve_recompute(recompute)
        self.partition = _resolve_partition(self._layers, self.schedule, partition)

        # -- local modules (no communication so far) --------------------------------------
        local_stages = self.schedule.stages_of(self.rank)
        indices = [i for s in local_stages for i in self.partition.layers_of(s)]
        modules = materialize(self._layers, indices, self.device, seed=seed)
        if tensor_parallel is not None:
            # Whole layers first (the same seed on every tp rank), then split: the shards are
            # exactly the unsplit model's (docs/decisions.md, "tensor parallel x pipeline").
            apply_tensor_parallel(modules, tp_mesh, tensor_parallel)
        self._owner = owner_indices(self._layers)
        self._local_modules = modules
        stages: dict[int, Stage] = {}
        for s in local_stages:
            span = self.partition.layers_of(s)
            stages[s] = Stage(
                s,
                span,
                [self._layers[i] for i in span],
                [modules[i] for i in span],
                is_first=s == 0,
                is_last=s == self.schedule.num_stages - 1,
                recompute_all=recompute_all,
                recompute_layers=recompute_layers,
            )
        self.stages: tuple[Stage, ...] = tuple(stages[s] for s in local_stages)
        for stage in self.stages:
            stage.check_plain_output = tensor_parallel is not None
        self._boundary_cache: dict[TensorMeta, list[TensorMeta]] = {}

        # -- communication ------------------------------------------------------------------
        pipeline_id = next(Pipeline._num_created)
        # The failure key is shared by the whole world, so a replica waiting in the
        # data-parallel all-reduce learns of a failure in another replica too.
        store = _default_store() if self._group is not None or data_parallel_group is not None else None
        self._board = FailureBoard(store, f"pipefold/pipeline{pipeline_id}/failure")
        # CPU ranks that outnumber the host's cores compute in turns; a timeline measured on
        # one host records it, so its cost model replays that (docs/decisions.md, "shared cores").
        # Data-parallel replicas on the host count too: they
        # compute beside this pipeline and take their share of the cores.
        num_replicas = dist.get_world_size(data_parallel_group) if data_parallel_group is not None else 1
        if tp_mesh is not None:
            num_replicas *= int(tp_mesh.size())  # tp peers compute beside this pipeline too
        host_processes = processes_on_host(num_ranks, num_replicas)
        self._shared_cores = (
            shared_cores(num_ranks, torch.get_num_threads(), host_processes)
            if self.device.type == "cpu"
            else None
        )
        if busy_wait is None:
            # Only shared-memory waits on CPU busy-poll; where processes share cores they
            # block on doorbells instead (docs/decisions.md, "busy polling").
            busy_wait = self.device.type == "cpu" and not ranks_share_cores(host_processes)
        self._watchdog = Watchdog(
            self._board,
            rank=self.rank,
            timeout_s=self._timeout_s,
            poll_completion=self.device.type == "cuda",
            busy_poll_s=BUSY_POLL_S if busy_wait else 0.0,
            world_ranks=self._ranks if self._group is not None else None,
        )
        p2p: P2P | None = None
        self._collectives: Collectives | None = None
        program = lower(self.schedule)
        # Events and waits of any rank fit in as many slots as the longest program has actions.
        self._timeline_slots = max(len(row) for row in program.instructions)
        if self._group is not None:
            p2p = P2P(self._group, self._ranks, self.device)
            self._collectives = Collectives(self._group, self._ranks, self.device, self._watchdog)
            if shared_memory and shared_memory_bytes > 0 and self.device.type == "cpu":
                mine = [a for a in program.instructions[self.rank] if not a.op.is_compute]
                p2p.connect_same_host(
                    self._collectives,
                    rank=self.rank,
                    send_peers=[program.peer_of(a) for a in mine if a.op in (Op.SEND_F, Op.SEND_B)],
                    recv_peers=[program.peer_of(a) for a in mine if a.op in (Op.RECV_F, Op.RECV_B)],
                    capacity=shared_memory_bytes,
                )
                # The step's start broadcast and end gather; the gathered row is the largest payload.
                # Sized for any flush schedule of this layout, so that `use_schedule` fits too.
                slots = max(self._timeline_slots, _most_slots(self.schedule))
                row_bytes = 8 * step_gather.row_length(slots, self.schedule.num_microbatches)
                self._collectives.connect_same_host(capacity=max(row_bytes, 64 * 1024))
        self._p2p = p2p
        self.tied = TiedGradients.of(
            self._layers, self.schedule, self.partition, self.rank, self._local_modules, p2p, self._watchdog
        )
        """The tied modules this rank shares with others, whose gradients each step sums."""
        self.recorder = StepRecorder(
            self._collectives,
            self.schedule,
            self._timeline_slots,
            partition=str(self.partition),
            device_type=self.device.type,
            shared_cores=self._shared_cores,
        )
        """Gathers each step's measurements into `last_step` (with `record_timeline`)."""
        self._data_parallel: DataParallel | None = None
        if data_parallel_group is not None:
            self._data_parallel = DataParallel(
                data_parallel_group, self.device, self._watchdog, list(self.parameters())
            )
            self._data_parallel.check_replicas_agree(self.rank, num_ranks, self.schedule.name)
        counter = ActivationCounter(self.parameters()) if record_timeline else None
        self._stage_of = stages
        stepping = self._attach_stashes(optimizer)

        def executor(program: Program) -> Executor:
            return Executor(
                program,
                self.rank,
                stages,
                loss_fn=loss_fn,
                device=self.device,
                p2p=p2p,
                watchdog=self._watchdog,
                counter=counter,
                step_fn=self._stash_step if stepping else None,
            )

        self._new_executor = executor
        self._executor = executor(program)
        self._broken: str | None = None
        self._last_step: step_gather.GatheredStep | None = None

    def use_schedule(self, schedule: Schedule) -> None:
        """Run `schedule` from the next step on, in place of the current one (see docs/decisions.md,
        "changing the schedule"). It must be a flush schedule for the same ranks, micro-batches and stage
        placement, so every rank keeps its stages, weights, optimizer and transport. Every rank
        of the pipeline, and of its replicas and tp peers, must switch to the same schedule
        before its next step (`pipefold train` broadcasts it). Raises ConfigError otherwise."""
        if not isinstance(schedule, Schedule):
            raise ConfigError(f"use_schedule({schedule!r}): give a pipefold.schedule.Schedule")
        current = self.schedule
        for what, now, new in (
            ("ranks", current.num_ranks, schedule.num_ranks),
            ("micro-batches", current.num_microbatches, schedule.num_microbatches),
            ("stage placement", current.placement, schedule.placement),
            ("weight update", current.weight_update, schedule.weight_update),
        ):
            if now != new:
                raise ConfigError(
                    f"use_schedule: {schedule.name or 'the schedule'!r} has {what} {new}, the running "
                    f"{current.name!r} {now}; a pipeline changes only the order of its actions (build a "
                    "new Pipeline for another layout)"
                )
        if schedule.weight_update is not WeightUpdate.FLUSH:
            raise ConfigError(
                f"use_schedule: {schedule.name!r} updates weights inside the step; only flush schedules "
                "can be swapped (their stashes hold the weight versions in flight)"
            )
        validate(schedule)
        if self._fuse_backward:
            schedule = fuse_adjacent_split_backward(schedule)
        program = lower(schedule)
        self._executor = self._new_executor(program)
        self._timeline_slots = max(len(row) for row in program.instructions)
        self.schedule = schedule
        self.recorder.use(schedule, self._timeline_slots)

    # -- configuration helpers ---------------------------------------------------------------

    def _check_optimizer(self, optimizer: OptimizerFactory | None) -> None:
        """Flush schedules leave the update to the user; asynchronous ones step inside `step`."""
        name = self.schedule.name
        if self.schedule.weight_update is WeightUpdate.FLUSH:
            if optimizer is not None:
                raise ConfigError(
                    f"optimizer is given but schedule {name!r} is a flush schedule; step your "
                    "optimizer after pipe.step() yourself and pass optimizer=None"
                )
            return
        if optimizer is None or not callable(optimizer):
            raise ConfigError(
                f"schedule {name!r} updates weights during the step ({self.schedule.weight_update}); pass "
                f"optimizer=lambda params: torch.optim.SGD(params, lr=...) (a factory), got {optimizer!r}"
            )

    def _check_tied_layers_whole(self, plan: TensorParallelPlan) -> None:
        """Tied layers exchange whole gradients, so a tensor-parallel plan must leave them whole
        (docs/decisions.md, "tensor parallel x pipeline")."""
        for key, occurrences in sorted(tied_groups(self._layers).items()):
            split = [i for i in occurrences if plan_for(plan, i, self._meta[i])]
            if split:
                raise ConfigError(
                    f"tensor_parallel splits the tied layer {key!r} (layers {split}): tied layers exchange "
                    "whole gradients between ranks; keep them out of the plan (return None for them)"
                )

    def _attach_stashes(self, optimizer: OptimizerFactory | None) -> bool:
        if optimizer is None:
            return False
        for stage in self.stages:
            if any(p.requires_grad for p in stage.parameters):
                stage.stash = WeightStash(stage.module, optimizer)
        return True

    def _stash_step(self, stage: int, index: int) -> None:
        stash = self._stage_of[stage].stash
        if stash is not None:  # a stage without trainable weights has nothing to update
            stash.step()

    # -- the group --------------------------------------------------------------------------------

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The pipeline's own group (its "pp" ranks); None when it runs in one process."""
        return self._group

    @property
    def global_ranks(self) -> tuple[int, ...]:
        """The world ranks of the pipeline's ranks, in pipeline-rank order."""
        return self._ranks

    # -- data parallelism -----------------------------------------------------------------------

    @property
    def data_parallel_rank(self) -> int:
        """This replica's index along "dp" (0 without data parallelism): which shard to pass."""
        return 0 if self._data_parallel is None else self._data_parallel.rank

    @property
    def num_data_parallel(self) -> int:
        """How many replicas share each step (1 without data parallelism)."""
        return 1 if self._data_parallel is None else self._data_parallel.num_replicas

    @property
    def data_parallel_group(self) -> dist.ProcessGroup | None:
        """The ranks that hold this rank's stages in the other replicas, this one included
        (the group gradients are averaged over); None without data parallelism."""
        return None if self._data_parallel is None else self._data_parallel.group

    @property
    def data_parallel(self) -> DataParallel | None:
        """The gradient averaging over the replicas; None without data parallelism."""
        return self._data_parallel

    @property
    def p2p(self) -> P2P | None:
        """The point-to-point transport between the pipeline's ranks; None in one process."""
        return self._p2p

    @property
    def collectives(self) -> Collectives | None:
        """The pipeline group's collectives (step start and end); None in one process."""
        return self._collectives

    @property
    def watchdog(self) -> Watchdog:
        """What bounds every wait of this rank and reports failures to the other ranks."""
        return self._watchdog

    @property
    def local_modules(self) -> Mapping[int, nn.Module]:
        """This rank's layers, by index in the model's layer list."""
        return self._local_modules

    @property
    def tensor_parallel_group(self) -> dist.ProcessGroup | None:
        """This stage's tensor-parallel ranks (along "tp"); None without tensor parallelism."""
        return self._tensor_parallel_group

    # -- parameters ----------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Local parameters named as `nn.Sequential(*layers)` names them ("3.weight")."""
        seen: set[int] = set()
        for index in sorted(self._local_modules):
            module = self._local_modules[index]
            for name, param in module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield f"{self._owner[index]}.{name}", param

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def state_dict(self) -> dict[str, Tensor]:
        """Local parameters and buffers, with nn.Sequential names."""
        result: dict[str, Tensor] = {}
        for index in sorted(self._local_modules):
            prefix = f"{self._owner[index]}."
            for name, value in self._local_modules[index].state_dict().items():
                result.setdefault(prefix + name, value)
        return result

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load this rank's entries of `state_dict` (a full-model state dict works on every rank).

        Entries of layers held by other ranks are ignored; a missing local entry is an error.
        """
        local = self.state_dict()
        missing = sorted(set(local) - set(state_dict))
        if missing:
            raise ConfigError(
                f"load_state_dict: rank {self.rank} needs {missing}, which the state dict lacks; "
                f"save with pipe.state_dict() on every rank (or from the full model) and merge"
            )
        with torch.no_grad():
            for name, value in local.items():
                source = state_dict[name]
                if tuple(source.shape) != tuple(value.shape):
                    raise ConfigError(
                        f"load_state_dict: {name} has shape {tuple(source.shape)} in the state dict but "
                        f"{tuple(value.shape)} in the model"
                    )
                # A tensor-parallel parameter takes its own slice of the whole tensor.
                local_shard(value).copy_(local_shard(shard_like(source, value)))

    # -- the step ------------------------------------------------------------------------------

    def step(self, inputs: Any, targets: Any) -> float:
        """Run one global batch through the schedule; returns the batch-mean loss on every rank.

        `inputs` (a tensor or tuple of tensors, batch first) is needed on the rank of
        stage 0, `targets` on the rank of the last stage; other ranks may pass None.
        With data parallelism each replica passes its own local batch (its shard of the
        global batch) and the loss returned is the mean over all replicas' rows.
        """
        if self._broken is not None:
            raise PipelineError(
                f"rank {self.rank}: this pipeline stopped after a failure ({self._broken}); "
                "its communication state is undefined, so build a new Pipeline (and process group)"
            )
        try:
            return self._step(inputs, targets)
        except NonFiniteLoss:
            raise  # every rank raises it alike after agreeing on the losses: nothing to report
        except PeerFailure as error:
            self._broken = str(error)
            raise
        except BaseException as error:
            self._broken = f"{type(error).__name__}: {error}"
            report = self._report(error)
            self._board.publish(report)
            if isinstance(error, PipelineError) and error.failed_rank is None:
                error.failed_rank = report.culprit
            if isinstance(error, PipefoldError) or not isinstance(error, Exception):
                raise
            raise PipelineError(str(report), failed_rank=report.culprit) from error

    def _report(self, error: BaseException) -> FailureReport:
        action = self._executor.current
        # Every replica has a rank 0; say which one failed.
        replica = f" (data-parallel replica {self.data_parallel_rank})" if self.num_data_parallel > 1 else ""
        return FailureReport(
            rank=self.rank,
            stage=None if action is None else action.stage,
            microbatch=None if action is None else action.microbatch,
            action="step setup" if action is None else str(action),
            message=f"{type(error).__name__}: {error}{replica}",
            world_rank=dist.get_rank() if dist.is_initialized() else None,
        )

    def _step(self, inputs: Any, targets: Any) -> float:
        schedule = self.schedule
        first_rank = schedule.placement[0]
        last_rank = schedule.placement[-1]
        batch_meta = None
        if self.rank == first_rank:
            if inputs is None:
                raise ConfigError(
                    f"rank {self.rank} holds stage 0 but step() got inputs=None; pass the batch on this rank"
                )
            batch_meta = TensorMeta.of(
                inputs, what="inputs", fix="pass a tensor or a tuple of tensors, batch first"
            )
        if self._collectives is not None:
            batch_meta = self._collectives.broadcast_object(batch_meta, src=first_rank, what="step start")
        if not isinstance(batch_meta, TensorMeta):
            raise PipelineError(f"rank {self.rank} received no batch description from rank {first_rank}")
        batch_size = _batch_size(batch_meta)
        num_microbatches = schedule.num_microbatches
        if batch_size < num_microbatches:
            raise ConfigError(
                f"the batch has {batch_size} rows but num_microbatches is {num_microbatches}; "
                f"use a batch of at least {num_microbatches} rows or fewer micro-batches"
            )
        sizes = [
            len(chunk)
            for chunk in torch.tensor_split(torch.empty(batch_size, device="meta"), num_microbatches)
        ]
        boundaries = [self._boundaries(batch_meta, size) for size in sizes]

        split_inputs = None
        if self.rank == first_rank:
            split_inputs = _split(inputs, num_microbatches, self.device)
        split_targets = None
        if self.rank == last_rank:
            if targets is None:
                raise ConfigError(
                    f"rank {self.rank} holds the last stage but step() got targets=None; pass them here"
                )
            target_rows = _batch_size(TensorMeta.of(targets, what="targets"))
            if target_rows != batch_size:
                raise ConfigError(
                    f"targets have {target_rows} rows but inputs have {batch_size}; give one target per row"
                )
            split_targets = _split(targets, num_microbatches, self.device)

        data_parallel = self._data_parallel
        skip = self._on_nonfinite == "skip"
        # With data parallelism the set-aside gradients are the snapshot (no copy).
        restore = self._grad_snapshot() if skip and data_parallel is None else []
        if data_parallel is not None:
            data_parallel.set_aside_gradients()
        tied_before = self.tied.snapshot()
        # Every rank decides alike (same step count, same broadcast batch shape), so the
        # counted peaks gathered into the timeline always come from the same step.
        count_memory = (
            batch_meta not in self._memory_counted_for
            or self._num_steps_run % self._count_memory_every == 0
        )
        self._num_steps_run += 1
        record = self._executor.run(
            StepInputs(split_inputs, split_targets, boundaries, [size / batch_size for size in sizes]),
            count_memory=count_memory,
        )
        if count_memory:
            self._memory_counted_for.add(batch_meta)
            self._activation_peak = record.activation_bytes_peak
        else:
            record = replace(record, activation_bytes_peak=self._activation_peak)
        gathered: step_gather.GatheredStep | None = None
        if self._record_timeline:
            # One all-gather brings every rank's losses and timeline (step_gather.py).
            versions = max(
                (st.stash.peak_versions_held for st in self.stages if st.stash is not None), default=1
            )
            gathered, losses = self.recorder.gather(record, versions)
        else:
            losses = record.losses
            if self._collectives is not None:
                self._collectives.all_reduce_sum(losses, what="loss all-reduce")
        weight = 1.0
        if data_parallel is not None:  # every replica then sees every replica's non-finite losses
            losses, weight = data_parallel.reduce_losses(losses, batch_size)
        bad = [mb for mb, finite in enumerate(torch.isfinite(losses).tolist()) if not finite]
        if bad and skip:
            self._restore(restore)
            if data_parallel is not None:
                data_parallel.restore_set_aside()
            logger.warning("non-finite loss in micro-batches %s: this step's gradients were skipped", bad)
        else:
            self.tied.sum(tied_before)
            if data_parallel is not None:
                data_parallel.average_gradients(weight)
        if gathered is not None:
            self._last_step = gathered
        if bad and not skip:
            raise NonFiniteLoss(
                f"the loss of micro-batch(es) {bad} is {losses[bad[0]].item()} (scaled by micro-batch size / "
                f"batch size); the gradients now hold non-finite values: zero them, lower the learning rate "
                f"or check the data, or pass on_nonfinite='skip' to drop such steps"
            )
        return float(losses.sum().item())

    def _boundaries(self, batch_meta: TensorMeta, rows: int) -> list[TensorMeta]:
        key = TensorMeta(
            shapes=tuple((rows, *shape[1:]) for shape in batch_meta.shapes),
            dtypes=batch_meta.dtypes,
            is_tuple=batch_meta.is_tuple,
        )
        cached = self._boundary_cache.get(key)
        if cached is None:
            sample = tuple(
                torch.empty(s, dtype=d, device="meta") for s, d in zip(key.shapes, key.dtypes, strict=True)
            )
            cached = trace_boundaries(self._layers, sample if key.is_tuple else sample[0], meta=self._meta)
            if self._sequence_sharded:
                num_shards = dist.get_world_size(self._tensor_parallel_group)
                cached = shard_boundaries(cached, self._sequence_sharded, num_shards)
            self._boundary_cache[key] = cached
        return cached

    def _grad_snapshot(self) -> list[tuple[nn.Parameter, Tensor | None]]:
        return [(p, grad_copy(p)) for p in self.parameters()]

    @staticmethod
    def _restore(snapshot: list[tuple[nn.Parameter, Tensor | None]]) -> None:
        for param, grad in snapshot:
            param.grad = grad

    @property
    def last_timeline(self) -> Timeline | None:
        """The measured timeline of the last step (every rank's actions), None before the first
        step or with `record_timeline=False`. Decoded when first read (see step_gather.py)."""
        return None if self._last_step is None else self._last_step.timeline()

    @property
    def last_step(self) -> step_gather.GatheredStep | None:
        """The last step's measurements, not yet decoded: keep several and call `.timeline()`
        on those you read, instead of decoding every step's `last_timeline`."""
        return self._last_step



# -- module helpers ----------------------------------------------------------------------------


def _most_slots(schedule: Schedule) -> int:
    """An upper bound on the actions of any rank's program for a flush schedule of this layout:
    per (stage, micro-batch) an F, an I and a W, and four messages."""
    per_rank = max(len(schedule.stages_of(rank)) for rank in range(schedule.num_ranks))
    return 7 * per_rank * schedule.num_microbatches


def resolve_group(process_group: Any) -> tuple[dist.ProcessGroup | None, tuple[int, ...]]:
    """The pipeline's group and its members' global ranks; (None, (0,)) for one process.

    A `DeviceMesh` has already been reduced to its "pp" group by `split_mesh`.
    """
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None, (0,)
        process_group = dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise ConfigError(
            f"process_group must be a torch.distributed ProcessGroup or a DeviceMesh with a 'pp' dim, "
            f"got {type(process_group).__name__}"
        )
    if dist.get_world_size(process_group) == 1:
        return None, (dist.get_rank(),)
    return process_group, tuple(dist.get_process_group_ranks(process_group))


def _resolve_schedule(
    schedule: str | Schedule, num_ranks: int, num_microbatches: int | None, num_virtual: int | None
) -> Schedule:
    if isinstance(schedule, Schedule):
        if schedule.num_ranks != num_ranks:
            raise ConfigError(
                f"schedule {schedule.name!r} is for {schedule.num_ranks} ranks but the process group has "
                f"{num_ranks}; build it with num_ranks={num_ranks}"
            )
        if num_microbatches is not None and num_microbatches != schedule.num_microbatches:
            raise ConfigError(
                f"num_microbatches={num_microbatches} but schedule {schedule.name!r} has "
                f"{schedule.num_microbatches}; leave num_microbatches unset when passing a Schedule"
            )
        if num_virtual is not None and num_virtual != schedule.num_virtual:
            raise ConfigError(
                f"num_virtual={num_virtual} but schedule {schedule.name!r} has {schedule.num_virtual} "
                "stages per rank; leave num_virtual unset when passing a Schedule"
            )
        return schedule
    if not isinstance(schedule, str):
        raise ConfigError(f"schedule must be a family name or a Schedule, got {type(schedule).__name__}")
    count = _num_microbatches(schedule, num_microbatches)
    return build(schedule, num_ranks=num_ranks, num_microbatches=count, num_virtual=num_virtual)


def _num_microbatches(schedule: str | Schedule, num_microbatches: int | None) -> int:
    if num_microbatches is not None:
        return num_microbatches
    return schedule.num_microbatches if isinstance(schedule, Schedule) else DEFAULT_NUM_MICROBATCHES


def _resolve_device(device: torch.device | str | None, group: dist.ProcessGroup | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            resolved = torch.device("cpu")
    else:
        resolved = torch.device(device)
    if group is not None:
        backend = str(dist.get_backend(group)).lower()
        if resolved.type == "cuda" and "nccl" not in backend:
            raise ConfigError(
                f"device {resolved} needs the nccl backend but the process group uses {backend}; "
                "init_process_group('nccl') for GPUs, or pass device='cpu'"
            )
        if resolved.type == "cpu" and "gloo" not in backend:
            raise ConfigError(
                f"device cpu needs the gloo backend but the process group uses {backend}; "
                "init_process_group('gloo') on CPU, or pass a CUDA device"
            )
    return resolved


def _resolve_recompute(recompute: str | Sequence[int]) -> tuple[bool, frozenset[int]]:
    """(recompute every layer, the layers to recompute); the rulebook has checked the value."""
    if isinstance(recompute, str):
        return recompute == "full", frozenset()
    return False, frozenset(recompute)


def _resolve_partition(
    layers: Sequence[LayerLike], schedule: Schedule, method: str | Sequence[int] | Partition
) -> Partition:
    return partition(layers, schedule.num_stages, method, placement=schedule.placement)


def _default_store() -> Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        logger.warning("no default store: failures of other ranks are only detected by timeout")
        return None


def _batch_size(meta: TensorMeta) -> int:
    rows = {shape[0] if shape else -1 for shape in meta.shapes}
    if len(rows) != 1 or -1 in rows:
        raise ConfigError(
            f"every tensor of a batch must have the same first (batch) dimension, got {meta}; "
            "put the batch dimension first"
        )
    return rows.pop()


def _split(value: Any, num_chunks: int, device: torch.device) -> list[Any]:
    if isinstance(value, Tensor):
        return list(torch.tensor_split(_to_device(value, device), num_chunks))
    columns = [torch.tensor_split(_to_device(tensor, device), num_chunks) for tensor in value]
    return [tuple(column[mb] for column in columns) for mb in range(num_chunks)]


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """`tensor` on `device`. A host batch bound for a GPU goes through page-locked memory
    and an asynchronous copy, so the host is not held up while the step's inputs travel
    (the copy is ordered on the current stream before the forwards that read it)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
        return pinned.to(device, non_blocking=True)
    return tensor.to(device)
