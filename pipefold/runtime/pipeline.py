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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, TypeVar

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
    layer_name,
    materialize,
    meta_layers,
    named_parameters,
    owner_indices,
    partition,
    tied_groups,
    trace_boundaries,
)
from pipefold.model.build import name_prefix, shared_names, shared_parameter_uses
from pipefold.parallel_config import ParallelConfig
from pipefold.runtime import step_gather
from pipefold.runtime.clip import GradientScope, not_counted
from pipefold.runtime.evaluate import ForwardOnly
from pipefold.runtime.executor import Executor, StepInputs
from pipefold.runtime.failure import BUSY_POLL_S, FailureBoard, FailureReport, Watchdog
from pipefold.runtime.loss_scale import DynamicLossScale
from pipefold.runtime.memory import ActivationCounter
from pipefold.runtime.options import (
    COMPUTE_DTYPES,
    LayoutOptions,
    OptimizerFactory,
    ParallelOptions,
    RuntimeOptions,
    TransportOptions,
)
from pipefold.runtime.parallel.data_parallel import DataParallel
from pipefold.runtime.parallel.dims import ParallelDims
from pipefold.runtime.parallel.tensor_parallel import local as local_shard
from pipefold.runtime.parallel.tensor_parallel import shard_like
from pipefold.runtime.processes.allocator import keep_freed_memory
from pipefold.runtime.processes.cores import processes_on_host, ranks_share_cores, shared_cores
from pipefold.runtime.recording import StepRecorder
from pipefold.runtime.stage import Stage
from pipefold.runtime.stash import WeightStash
from pipefold.runtime.tied import TiedGradients, grad_copy
from pipefold.runtime.transport.comm import P2P, Collectives
from pipefold.runtime.transport.setup import Transport
from pipefold.schedule import Schedule, WeightUpdate, build, lower
from pipefold.schedule.lower import Program, fuse_adjacent_split_backward
from pipefold.schedule.validate import validate
from pipefold.timeline import Timeline

__all__ = ["Pipeline"]

logger = logging.getLogger(__name__)

DEFAULT_NUM_MICROBATCHES = 8
"""Micro-batches per step where neither the caller nor a ready `Schedule` says."""

LossFn = Callable[[Any, Any], Tensor]
OptionGroup = TypeVar("OptionGroup", LayoutOptions, ParallelOptions, RuntimeOptions, TransportOptions)


class Pipeline:
    """Pipeline-parallel execution of `layers` on the ranks of a process group.

    Every rank constructs the pipeline with the same arguments. All configuration is
    checked here, before any communication; see the module docstring for a step.

    - `layers`: an `nn.Sequential` or a list of modules / `LayerSpec`s (pipefold.model).
    - `loss_fn(output, target)`: the scalar mean over one micro-batch, on the last stage.
    - `schedule`: a family name (`pipefold.schedule.names()`) or a ready `Schedule`;
      `num_microbatches` (default 8) and `num_virtual` are passed to `build`.
    - `layout`: which layers each stage holds, recomputation, device and seed (`LayoutOptions`).
    - `parallel`: the process group or `DeviceMesh`, data and tensor parallelism, and the
      optimizer factory of asynchronous schedules (`ParallelOptions`).
    - `runtime`: waiting, failure and non-finite handling, timeline recording, backward
      fusion and heap tuning (`RuntimeOptions`).
    - `transport`: shared memory between ranks on one host (`TransportOptions`).

    Each group's fields are described in pipefold/runtime/options.py; a group left out takes
    its defaults.
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
        layout: LayoutOptions | None = None,
        parallel: ParallelOptions | None = None,
        runtime: RuntimeOptions | None = None,
        transport: TransportOptions | None = None,
    ) -> None:
        self._layers = as_layers(layers)
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable (output, target) -> scalar tensor, got {loss_fn!r}")
        self.layout_options = _option(layout, LayoutOptions, "layout")
        """Which layers each stage holds, how they are built and where."""
        self.parallel_options = _option(parallel, ParallelOptions, "parallel")
        """The groups, the other parallel dimensions and an asynchronous schedule's optimizer."""
        self.runtime_options = _option(runtime, RuntimeOptions, "runtime")
        """How this pipeline waits, records and runs its backward."""
        self.transport_options = _option(transport, TransportOptions, "transport")
        """How boundary tensors travel between ranks."""
        self._loss_fn = loss_fn
        self._num_steps_run = 0
        self._memory_counted_for: set[TensorMeta] = set()
        self._activation_peak = 0

        self.dims = ParallelDims.of(self.parallel_options)
        """This rank's pipeline group, replicas ("dp") and tensor-parallel peers ("tp")."""
        dims = self.dims
        self.rank = dims.rank
        recompute = self.layout_options.recompute
        # The rulebook first with what is known before the schedule is built, then with it.
        described = ParallelConfig(
            pp=dims.num_ranks,
            dp=dims.num_data_parallel,
            tp=dims.num_tensor_parallel,
            num_microbatches=_num_microbatches(schedule, num_microbatches),
            num_virtual=num_virtual,
            schedule=schedule.name if isinstance(schedule, Schedule) else str(schedule),
            recompute=recompute if isinstance(recompute, str) else tuple(recompute),
            on_nonfinite=self.runtime_options.on_nonfinite,
            tied_layers=bool(tied_groups(self._layers)),
            num_layers=len(self._layers),
        )
        described.check()
        self.schedule = _resolve_schedule(schedule, dims.num_ranks, num_microbatches, num_virtual)
        self.parallel_config = replace(
            described,
            num_virtual=self.schedule.num_virtual,
            schedule=self.schedule.name,
            weight_update=str(self.schedule.weight_update),
        )
        """This pipeline's configuration as the rulebook (`pipefold.parallel_config`) checked it."""
        self.parallel_config.check()
        if self.runtime_options.fuse_backward:
            # Adjacent I/W pairs whose early input gradient nobody waits for run as one B:
            # same result, cheaper (see fuse_adjacent_split_backward). `self.schedule` is
            # what runs, so the measured timeline and a simulation of it line up.
            self.schedule = fuse_adjacent_split_backward(self.schedule)
        self._check_optimizer(self.parallel_options.optimizer)
        self._meta = meta_layers(self._layers)
        # Parameters several layers hold (a tied embedding and head of a plain list or a split
        # module): tied like TiedLayerSpec where they span ranks, or refused below.
        self._shared = shared_parameter_uses(self._layers, self._meta)
        if dims.tensor_parallel is not None:
            self._check_tied_layers_whole(dims)
        # Layer outputs a tp rank holds split along the sequence: the boundaries after them
        # carry 1/tp of the traced shape.
        self._sequence_sharded = dims.sequence_sharded(self._meta)
        self.device = dims.check_device(self.layout_options.device)
        if self.runtime_options.keep_cpu_heap and self.device.type == "cpu":
            keep_freed_memory()
        recompute_all, recompute_layers = _resolve_recompute(recompute)
        self.partition = _resolve_partition(self._layers, self.schedule, self.layout_options.partition)
        self._check_shared_parameters()

        # -- local modules (no communication so far) --------------------------------------
        local_stages = self.schedule.stages_of(self.rank)
        indices = [i for s in local_stages for i in self.partition.layers_of(s)]
        modules = materialize(self._layers, indices, self.device, seed=self.layout_options.seed)
        # Whole layers first (the same seed on every tp rank), then split.
        dims.split_layers(modules)
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
        self.compute_dtype = COMPUTE_DTYPES[self.runtime_options.precision]
        """The autocast dtype of each stage's forward and of floating boundaries (None: fp32)."""
        for stage in self.stages:
            stage.check_plain_output = dims.tensor_parallel is not None
            stage.compute_dtype = self.compute_dtype
            stage.device_type = self.device.type
        self._boundary_cache: dict[TensorMeta, list[TensorMeta]] = {}

        # -- communication ------------------------------------------------------------------
        pipeline_id = next(Pipeline._num_created)
        # The failure key is shared by the whole world, so a replica waiting in the
        # data-parallel all-reduce learns of a failure in another replica too.
        store = _default_store() if dims.communicates else None
        self._board = FailureBoard(store, f"pipefold/pipeline{pipeline_id}/failure")
        # CPU ranks that outnumber the host's cores compute in turns; a timeline measured on
        # one host records it, so its cost model replays that (docs/decisions.md, "shared cores").
        # Data-parallel replicas and tp peers on the host compute beside this pipeline and
        # take their share of the cores.
        host_processes = processes_on_host(dims.num_ranks, dims.processes_beside())
        self._shared_cores = (
            shared_cores(dims.num_ranks, torch.get_num_threads(), host_processes)
            if self.device.type == "cpu"
            else None
        )
        busy_wait = self.runtime_options.busy_wait
        if busy_wait is None:
            # Only shared-memory waits on CPU busy-poll; where processes share cores they
            # block on doorbells instead (docs/decisions.md, "busy polling").
            busy_wait = self.device.type == "cpu" and not ranks_share_cores(host_processes)
        self._watchdog = Watchdog(
            self._board,
            rank=self.rank,
            timeout_s=float(self.runtime_options.timeout_s),
            poll_completion=self.device.type == "cuda",
            busy_poll_s=BUSY_POLL_S if busy_wait else 0.0,
            world_ranks=dims.ranks if dims.pipeline_group is not None else None,
        )
        program = lower(self.schedule)
        # Events and waits of any rank fit in as many slots as the longest program has actions.
        self._timeline_slots = max(len(row) for row in program.instructions)
        self.transport = Transport.connect(
            dims.pipeline_group,
            dims.ranks,
            self.rank,
            self.device,
            self._watchdog,
            program,
            self.transport_options,
        )
        """The point-to-point transport and collectives between the pipeline's ranks."""
        p2p = self.transport.p2p
        self.tied = TiedGradients.of(
            self._layers,
            self.schedule,
            self.partition,
            self.rank,
            self._local_modules,
            p2p,
            self._watchdog,
            shared=self._shared,
        )
        """The tied modules and shared parameters this rank holds with others, whose gradients
        each step sums."""
        self.recorder = StepRecorder(
            self.transport.collectives,
            self.schedule,
            self._timeline_slots,
            partition=str(self.partition),
            device_type=self.device.type,
            shared_cores=self._shared_cores,
        )
        """Gathers each step's measurements into `last_step` (with `RuntimeOptions.record_timeline`)."""
        self._data_parallel = dims.data_parallel(
            self.device, self._watchdog, list(self.parameters()), self.schedule.name
        )
        self.loss_scale = self._new_loss_scale()
        """fp16's dynamic loss scale (`scale`, `skipped`); None in fp32 and bf16."""
        counter = ActivationCounter(self.parameters()) if self.runtime_options.record_timeline else None
        self._stage_of = stages
        stepping = self._attach_stashes(self.parallel_options.optimizer)

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

    def _new_loss_scale(self) -> DynamicLossScale | None:
        options = self.runtime_options
        if options.loss_scale is None:
            return None
        dims = self.dims
        # One agreement over every rank of the job: with replicas or tp peers that is the world
        # (the mesh); a lone pipeline agrees within its own group.
        spans_more = dims.data_parallel_group is not None or dims.tensor_parallel_group is not None
        group = dist.group.WORLD if spans_more else dims.pipeline_group
        return DynamicLossScale(
            options.loss_scale,
            growth_interval=options.loss_scale_growth_interval,
            group=group,
            watchdog=self._watchdog,
        )

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
        if self.runtime_options.fuse_backward:
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
                    f"ParallelOptions.optimizer is given but schedule {name!r} is a flush schedule; step "
                    "your optimizer after pipe.step() yourself and leave ParallelOptions.optimizer None"
                )
            return
        if self.runtime_options.loss_scale is not None:
            raise ConfigError(
                f"RuntimeOptions(precision='fp16') with schedule {name!r}: it updates weights inside the "
                "step, from gradients still multiplied by the loss scale and before every rank has agreed "
                "on an overflow; use a flush schedule for fp16, or bf16 (no loss scale)"
            )
        if optimizer is None:
            raise ConfigError(
                f"schedule {name!r} updates weights during the step ({self.schedule.weight_update}); pass "
                "parallel=ParallelOptions(optimizer=lambda params: torch.optim.SGD(params, lr=...)) "
                "(a factory)"
            )

    def _check_tied_layers_whole(self, dims: ParallelDims) -> None:
        """Tied layers exchange whole gradients, so a tensor-parallel plan must leave them whole
        (docs/decisions.md, "tensor parallel x pipeline")."""
        for key, occurrences in sorted(tied_groups(self._layers).items()):
            split = [i for i in occurrences if dims.splits(i, self._meta[i])]
            if split:
                raise ConfigError(
                    f"tensor_parallel splits the tied layer {key!r} (layers {split}): tied layers exchange "
                    "whole gradients between ranks; keep them out of the plan (return None for them)"
                )

    def _check_shared_parameters(self) -> None:
        """Refuse a shared parameter the pipeline cannot keep one weight: split by a tensor-parallel
        plan, or held by two stages of a schedule that updates each stage inside the step."""
        for name, uses in sorted(self._shared.items()):
            where = " and ".join(
                f"layer {index} ({layer_name(self._layers[index])}, stage "
                f"{self.partition.stage_of(index)}) as {use!r}"
                for index, use in uses
            )
            split = [index for index, _ in uses if self.dims.splits(index, self._meta[index])]
            if split:
                raise ConfigError(
                    f"parameter {name!r} is shared by {where}, and tensor_parallel splits layer(s) {split}: "
                    "a shared parameter is tied by summing whole gradients between its holders; keep "
                    "those layers out of the plan (return None for them)"
                )
            stages = {self.partition.stage_of(index) for index, _ in uses}
            if len(stages) > 1 and self.schedule.weight_update is not WeightUpdate.FLUSH:
                raise ConfigError(
                    f"parameter {name!r} is shared by {where}: schedule {self.schedule.name!r} updates "
                    "each stage's weights inside the step, so the stages would update their uses apart; "
                    "use a flush schedule, or put every use on one stage (LayoutOptions(partition=...))"
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
        return self.dims.pipeline_group

    @property
    def global_ranks(self) -> tuple[int, ...]:
        """The world ranks of the pipeline's ranks, in pipeline-rank order."""
        return self.dims.ranks

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
        return self.transport.p2p

    @property
    def collectives(self) -> Collectives | None:
        """The pipeline group's collectives (step start and end); None in one process."""
        return self.transport.collectives

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
        return self.dims.tensor_parallel_group

    # -- parameters ----------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Local parameters named as `nn.Sequential(*layers)` names them ("3.weight"); the pieces
        of `pipefold.split(module)` keep `module`'s own names ("transformer.h.3.attn.c_attn.weight").
        A parameter held by several layers (tied or shared) is listed once, under its first name."""
        yield from named_parameters(self._layers, self._local_modules, self._shared)

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def state_dict(self) -> dict[str, Tensor]:
        """Local parameters and buffers, named as `named_parameters` names them; buffers as the
        layer's own state dict names them, after the same prefix. Gathered over the ranks, it
        holds every entry of the model's state dict once (a shared parameter under its first name)."""
        result: dict[str, Tensor] = {}
        for index in sorted(self._local_modules):
            module = self._local_modules[index]
            names = shared_names(index, self._owner[index], module, self._shared)
            prefix = name_prefix(self._owner[index], module)
            for name, value in module.state_dict().items():
                result.setdefault(names.get(name, prefix + name), value)
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

    def clip_grad_norm_(
        self, max_norm: float, norm_type: float = 2.0, *, error_if_nonfinite: bool = False
    ) -> float:
        """Clip the whole model's gradients to norm `max_norm`; returns the norm before clipping,
        the same float on every rank. Call it on every rank (of every replica and tp peer) after
        `step()`: it equals `torch.nn.utils.clip_grad_norm_` on the unsplit model (each gradient
        entry counted once; see pipefold/runtime/clip.py)."""
        if self.schedule.weight_update is not WeightUpdate.FLUSH:
            raise ConfigError(
                f"clip_grad_norm_: schedule {self.schedule.name!r} updates weights inside the step, "
                "before any clipping could run; use a flush schedule to clip"
            )
        return self.gradient_scope().clip_(max_norm, norm_type, error_if_nonfinite=error_if_nonfinite)

    def gradient_scope(self) -> GradientScope:
        """The gradients this rank counts toward the model's norm and how ranks combine them."""
        tp_group = self.tensor_parallel_group
        return GradientScope(
            params=tuple(p for p in self.parameters() if p.requires_grad),
            not_counted=not_counted(self.tied.groups, self.rank),
            tp_group=tp_group,
            tp_rank=0 if tp_group is None else dist.get_rank(tp_group),
            collectives=self.collectives,
            watchdog=self._watchdog,
        )

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

    def evaluate(self, inputs: Any, targets: Any) -> float:
        """The batch-mean loss of one batch, forward only (no gradients, no update), on every rank:
        called like `step` on every rank; see pipefold/runtime/evaluate.py."""
        if self._broken is not None:
            raise PipelineError(f"rank {self.rank}: this pipeline stopped after a failure ({self._broken})")
        forward_only = ForwardOnly(
            schedule=self.schedule, rank=self.rank, stages=self._stage_of, loss_fn=self._loss_fn,
            boundaries=self._boundaries, split=lambda value, n: _split(value, n, self.device),
            device=self.device, p2p=self.p2p, collectives=self.collectives,
            data_parallel=self._data_parallel, watchdog=self._watchdog,
        )
        try:
            return forward_only.run(inputs, targets)
        except PeerFailure as error:
            self._broken = str(error)
            raise
        except BaseException as error:
            self._broken = f"{type(error).__name__}: {error}"
            self._board.publish(self._report(error))
            raise

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
        collectives = self.transport.collectives
        if collectives is not None:
            batch_meta = collectives.broadcast_object(batch_meta, src=first_rank, what="step start")
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
        skip = self.runtime_options.on_nonfinite == "skip"
        scaler = self.loss_scale
        params = list(self.parameters()) if scaler is not None else []
        # With data parallelism (or a loss scale) the set-aside gradients are the snapshot (no copy).
        restore = self._grad_snapshot() if skip and data_parallel is None and scaler is None else []
        if data_parallel is not None:
            data_parallel.set_aside_gradients()
        elif scaler is not None:
            scaler.set_aside(params)
        tied_before = self.tied.snapshot()
        # Every rank decides alike (same step count, same broadcast batch shape), so the
        # counted peaks gathered into the timeline always come from the same step.
        count_memory = (
            batch_meta not in self._memory_counted_for
            or self._num_steps_run % self.runtime_options.count_memory_every == 0
        )
        self._num_steps_run += 1
        record = self._executor.run(
            StepInputs(
                split_inputs, split_targets, boundaries, [size / batch_size for size in sizes],
                loss_scale=1.0 if scaler is None else scaler.scale,
            ),
            count_memory=count_memory,
        )
        if count_memory:
            self._memory_counted_for.add(batch_meta)
            self._activation_peak = record.activation_bytes_peak
        else:
            record = replace(record, activation_bytes_peak=self._activation_peak)
        gathered: step_gather.GatheredStep | None = None
        if self.runtime_options.record_timeline:
            # One all-gather brings every rank's losses and timeline (step_gather.py).
            versions = max(
                (st.stash.peak_versions_held for st in self.stages if st.stash is not None), default=1
            )
            gathered, losses = self.recorder.gather(record, versions)
        else:
            losses = record.losses
            if collectives is not None:
                collectives.all_reduce_sum(losses, what="loss all-reduce")
        weight = 1.0
        if data_parallel is not None:  # every replica then sees every replica's non-finite losses
            losses, weight = data_parallel.reduce_losses(losses, batch_size)
        bad = [mb for mb, finite in enumerate(torch.isfinite(losses).tolist()) if not finite]
        overflow = scaler is not None and scaler.overflowed(params, self.device)
        if (bad and skip) or overflow:
            self._restore(restore)
            if data_parallel is not None:
                data_parallel.restore_set_aside()
            elif scaler is not None:
                scaler.restore(params)
            if bad:
                logger.warning("non-finite loss in micro-batches %s: this step's gradients were skipped", bad)
        else:
            self.tied.sum(tied_before)
            if data_parallel is not None:
                data_parallel.average_gradients(weight if scaler is None else weight / scaler.scale)
            elif scaler is not None:
                scaler.unscale_and_add_back(params)
        if scaler is not None:
            scaler.update(overflow)
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
            cached = self.dims.shard_boundaries(cached, self._sequence_sharded)
            if self.compute_dtype is not None:
                cached = _in_compute_dtype(cached, self.compute_dtype)
            self._boundary_cache[key] = cached
        return cached

    def _grad_snapshot(self) -> list[tuple[nn.Parameter, Tensor | None]]:
        return [(p, grad_copy(p)) for p in self.parameters()]

    @staticmethod
    def _restore(snapshot: list[tuple[nn.Parameter, Tensor | None]]) -> None:
        for param, grad in snapshot:
            param.grad = grad

    @property
    def last_sent_bytes(self) -> int:
        """Bytes of boundary tensors and gradients this rank sent to other ranks in the last
        step (half under bf16 what fp32 sends)."""
        return self._executor.sent_bytes

    @property
    def last_timeline(self) -> Timeline | None:
        """The measured timeline of the last step (every rank's actions), None before the first
        step or with `RuntimeOptions(record_timeline=False)`. Decoded when first read (see step_gather.py)."""
        return None if self._last_step is None else self._last_step.timeline()

    @property
    def last_step(self) -> step_gather.GatheredStep | None:
        """The last step's measurements, not yet decoded: keep several and call `.timeline()`
        on those you read, instead of decoding every step's `last_timeline`."""
        return self._last_step



# -- module helpers ----------------------------------------------------------------------------


def _option(value: Any, kind: type[OptionGroup], keyword: str) -> OptionGroup:
    """`value` (None: `kind()`, every default), refused unless it is a `kind`."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise ConfigError(
            f"Pipeline({keyword}={value!r}): give a pipefold.runtime.{kind.__name__}(...) "
            "(see pipefold/runtime/options.py)"
        )
    return value


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


def _in_compute_dtype(boundaries: list[TensorMeta], dtype: torch.dtype) -> list[TensorMeta]:
    """The boundaries as stages cast them under mixed precision (`Stage.forward`): fp32 entries
    travel in `dtype`; the last layer's output (the loss function's input) is left as traced."""
    def cast(meta: TensorMeta) -> TensorMeta:
        return replace(meta, dtypes=tuple(dtype if d == torch.float32 else d for d in meta.dtypes))

    return [cast(meta) for meta in boundaries[:-1]] + boundaries[-1:]


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
