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

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch.distributed as dist
from torch import Tensor, nn
from torch._C._distributed_c10d import Store

from pipefold.device import check_compiler
from pipefold.errors import ConfigError, NonFiniteLoss
from pipefold.model import LayerLike, as_layers, meta_layers, named_parameters, owner_indices
from pipefold.model.build import shared_parameter_uses
from pipefold.model.dropout import dropout_steps
from pipefold.runtime import step_gather
from pipefold.runtime.arguments import (
    check_optimizer,
    check_swappable,
    describe,
    option_group,
    resolve_partition,
    resolve_schedule,
)
from pipefold.runtime.clip import GradientScope, not_counted
from pipefold.runtime.evaluate import ForwardOnly
from pipefold.runtime.executor import Executor, StageHooks, StepInputs, StepRecord
from pipefold.runtime.failure import FailureBoard, FailureReport, Watchdog
from pipefold.runtime.guard import FailureGuard
from pipefold.runtime.local_stages import build_local_stages
from pipefold.runtime.local_state import load_local_state, local_state_dict
from pipefold.runtime.memory import ActivationCounter, CountingTurns
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
from pipefold.runtime.parallel.full_shard import FullSharding, tied_stages
from pipefold.runtime.processes.allocator import keep_freed_memory
from pipefold.runtime.progress import Progress
from pipefold.runtime.recording import StepRecorder
from pipefold.runtime.selective import check_selective
from pipefold.runtime.shared_checks import check_shared_parameters, check_tied_layers_whole
from pipefold.runtime.stage import Stage, held_casts
from pipefold.runtime.stash import WeightStash
from pipefold.runtime.step_batch import BoundaryShapes, split_batch
from pipefold.runtime.step_gradients import StepGradients, new_loss_scale
from pipefold.runtime.streaming import StreamProgram, step_losses, stream_inputs, stream_program
from pipefold.runtime.tied import TiedGradients
from pipefold.runtime.transport.comm import P2P, Collectives
from pipefold.runtime.transport.setup import Transport
from pipefold.runtime.update_reduction import UpdateReduction, owner_groups
from pipefold.runtime.waiting import host_watchdog
from pipefold.schedule import Schedule, WeightUpdate, lower
from pipefold.schedule.lower import Program, fuse_adjacent_split_backward
from pipefold.timeline import Timeline

__all__ = ["Pipeline"]

logger = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Tensor]


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
        self.layout_options = option_group(layout, LayoutOptions, "layout")
        """Which layers each stage holds, how they are built and where."""
        self.parallel_options = option_group(parallel, ParallelOptions, "parallel")
        """The groups, the other parallel dimensions and an asynchronous schedule's optimizer."""
        self.runtime_options = option_group(runtime, RuntimeOptions, "runtime")
        """How this pipeline waits, records and runs its backward."""
        self.transport_options = option_group(transport, TransportOptions, "transport")
        """How boundary tensors travel between ranks."""
        if self.runtime_options.compile:
            check_compiler("RuntimeOptions.compile")
        self._loss_fn = loss_fn
        self._num_steps_run = 0
        self._counting = CountingTurns(self.runtime_options.count_memory_every)

        self.dims = ParallelDims.of(self.parallel_options)
        """This rank's pipeline group, replicas ("dp") and tensor-parallel peers ("tp")."""
        dims = self.dims
        self.rank = dims.rank
        # The rulebook first with what is known before the schedule is built, then with it.
        described = describe(
            self._layers, schedule, num_microbatches, num_virtual,
            (dims.num_ranks, dims.num_data_parallel, dims.num_tensor_parallel),
            self.layout_options, self.parallel_options, self.runtime_options,
        )
        described.check()
        self.schedule = resolve_schedule(schedule, dims.num_ranks, num_microbatches, num_virtual)
        self._most_microbatches = self.schedule.num_microbatches
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
        check_optimizer(self.schedule, self.runtime_options, self.parallel_options.optimizer)
        self._meta = meta_layers(self._layers)
        # Parameters several layers hold (a tied embedding and head of a plain list or a split
        # module): tied like TiedLayerSpec where they span ranks, or refused below.
        self._shared = shared_parameter_uses(self._layers, self._meta)
        self.parallel_config = replace(self.parallel_config, shared_parameters=bool(self._shared))
        self.parallel_config.check()
        if dims.tensor_parallel is not None:
            check_tied_layers_whole(self._layers, self._meta, dims)
        if self.layout_options.recompute == "selective":
            check_selective(self._meta)
        # Layer outputs a tp rank holds split along the sequence: the boundaries after them
        # carry 1/tp of the traced shape.
        self._sequence_sharded = dims.sequence_sharded(self._meta)
        self.device = dims.check_device(self.layout_options.device)
        if self.runtime_options.keep_cpu_heap and self.device.type == "cpu":
            keep_freed_memory()
        self.partition = resolve_partition(self._layers, self.schedule, self.layout_options.partition)
        check_shared_parameters(
            self._shared, self._layers, self._meta, dims, self.schedule, self.partition
        )

        # -- local modules (no communication so far) --------------------------------------
        modules, stages = build_local_stages(
            self._layers, self.schedule, self.partition, self.rank, self.device, dims,
            self.layout_options, self.runtime_options,
        )
        self._owner = owner_indices(self._layers)
        self._local_modules = modules
        self.stages: tuple[Stage, ...] = tuple(stages.values())
        self.sharding: FullSharding | None = (
            FullSharding(
                self.stages, dims.data_parallel_group, self.device,
                free_between=self.parallel_options.free_between_microbatches,
                lookahead=self.parallel_options.gather_lookahead,
                root_mesh=self.parallel_options.process_group,
                tied=tied_stages(self._layers, self.partition, self._shared, self._meta),
            )
            if self.parallel_options.shard == "full" and dims.data_parallel_group is not None
            else None
        )
        """With `ParallelOptions(shard="full")`: this rank's stages sharded over "dp" (FSDP2),
        gathered and freed by the schedule (runtime/parallel/full_shard.py); else None."""
        self.compute_dtype = COMPUTE_DTYPES[self.runtime_options.precision]
        """The autocast dtype of each stage's forward and of floating boundaries (None: fp32)."""
        self._boundaries = BoundaryShapes(
            self._layers, self._meta, dims, self._sequence_sharded, self.compute_dtype
        )
        """Each layer's output description for (batch description, micro-batch rows), cached."""

        # -- communication ------------------------------------------------------------------
        pipeline_id = next(Pipeline._num_created)
        # The failure key is shared by the whole world, so a replica waiting in the
        # data-parallel all-reduce learns of a failure in another replica too.
        store = _default_store() if dims.communicates else None
        self._board = FailureBoard(store, f"pipefold/pipeline{pipeline_id}/failure")
        self._watchdog, self._shared_cores = host_watchdog(
            self._board, dims, self.device, self.runtime_options
        )
        program = lower(self._with_sharding(self.schedule))
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
        collectives_ = self.transport.collectives
        self.progress = (
            collectives_.progress if collectives_ is not None else Progress(None, rank=self.rank, num_ranks=1)
        )
        """Where each rank of the pipeline is (pipefold/runtime/progress.py); see `phase`."""
        self._watchdog.progress = self.progress
        self.tied = TiedGradients.of(
            self._layers,
            self.schedule,
            self.partition,
            self.rank,
            self._local_modules,
            p2p,
            self._watchdog,
            shared=self._shared, collectives=collectives_,
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
            self.device, self._watchdog, list(self.parameters()), self.schedule.name,
            reduced_in_schedule=self.sharding is not None,
            stage_params=(
                {stage.index: stage.parameters for stage in self.stages}
                # An asynchronous schedule reduces each update at its STEP (update_reduction.py).
                if self.parallel_options.overlap_reduction
                and self.schedule.weight_update is WeightUpdate.FLUSH
                else None
            ),
        )
        data_parallel = self._data_parallel
        self._stage_hooks: StageHooks | None = (
            data_parallel if data_parallel is not None and data_parallel.overlaps else None
        )
        if self.sharding is not None and (self._shared or self.parallel_config.tied_layers):
            self.sharding.check_one_replica(collectives_)  # tied owners sum matching shards
        self.loss_scale = new_loss_scale(self.runtime_options, self.dims, self._watchdog)
        """fp16's dynamic loss scale (`scale`, `skipped`); None in fp32 and bf16."""
        counter = ActivationCounter(self.parameters()) if self.runtime_options.record_timeline else None
        self._stage_of = stages
        stepping = self._attach_stashes(self.parallel_options.optimizer)
        self._update_reduction = (
            UpdateReduction.of(
                {stage.index: stage.stash.parameters for stage in self.stages if stage.stash is not None},
                self.tied, self.schedule, self.rank, dims.data_parallel_group, self._watchdog,
                groups=owner_groups(self.tied, dims),  # every rank of the world, in one order
            )
            if stepping
            else None
        )
        """Asynchronous schedules: each STEP's tied sum and replica average (update_reduction.py)."""

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
                progress=self.progress,
                stage_hooks=self._stage_hooks,
                sharding=self.sharding,
            )

        self._new_executor = executor
        self._executor = executor(program)
        # The last streaming run's program and its executor, reused by a run of as many steps.
        self._stream_run: tuple[StreamProgram, Executor] | None = None
        self._guard = FailureGuard(self.rank, self._board, self.progress, self._watchdog, self._report)
        self._last_step: step_gather.GatheredStep | None = None

    @property
    def running_schedule(self) -> Schedule:
        """The schedule this pipeline runs: `schedule`, with full sharding's actions added."""
        return self._with_sharding(self.schedule)

    def _with_sharding(self, schedule: Schedule) -> Schedule:
        """What this rank runs of `schedule`: with full sharding, its UNSHARD / REDUCE_GRAD /
        RESHARD actions added (runtime/parallel/full_shard.py)."""
        return schedule if self.sharding is None else self.sharding.schedule(schedule)

    def use_schedule(self, schedule: Schedule) -> None:
        """Run `schedule` from the next step on, in place of the current one (see docs/decisions.md,
        "changing the schedule"). It must be a flush schedule for the same ranks and stage placement,
        with at most the micro-batches the pipeline was built with (its transport is sized for
        them), so every rank keeps its stages, weights, optimizer and transport. Every rank
        of the pipeline, and of its replicas and tp peers, must switch to the same schedule
        before its next step (`pipefold train` broadcasts it). Raises ConfigError otherwise."""
        schedule = check_swappable(self.schedule, schedule, self._most_microbatches)
        if self.runtime_options.fuse_backward:
            schedule = fuse_adjacent_split_backward(schedule)
        program = lower(self._with_sharding(schedule))
        self._executor = self._new_executor(program)
        self._timeline_slots = max(len(row) for row in program.instructions)
        self.schedule = schedule
        self.recorder.use(schedule, self._timeline_slots)
        self._counting.forget()  # another order (or recomputation) has other peaks

    # -- configuration helpers ---------------------------------------------------------------

    def _attach_stashes(self, optimizer: OptimizerFactory | None) -> bool:
        if optimizer is None:
            return False
        for stage in self.stages:
            if any(p.requires_grad for p in stage.parameters):
                stage.stash = WeightStash(stage.module, optimizer)
        return True

    def _begin_updates(self, rows: int) -> bool:
        """Asynchronous schedules reduce each update at its STEP: set this replica's weight
        (a collective over "dp"); returns whether they do."""
        reduction = self._update_reduction
        if reduction is None:
            return False
        data_parallel = self._data_parallel
        reduction.begin(1.0 if data_parallel is None else data_parallel.weight_of(rows))
        return True

    def _stash_step(self, stage: int, index: int) -> None:
        stash = self._stage_of[stage].stash
        if stash is not None:  # a stage without trainable weights has nothing to update
            if self._update_reduction is not None:
                self._update_reduction.before_step(stage)
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
        return local_state_dict(self._local_modules, self._owner, self._shared)

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load this rank's entries of `state_dict` (a full-model state dict works on every rank).

        Entries of layers held by other ranks are ignored; a missing local entry is an error.
        """
        load_local_state(self.rank, self.state_dict(), state_dict)

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
            shard_group=self.data_parallel_group if self.sharding is not None else None,
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
        return self._guard.run(lambda: self._step(inputs, targets))

    def train(self, batches: Iterable[tuple[Any, Any]] | None, *, steps: int) -> list[float]:
        """Run `steps` optimizer steps as one stream, without draining between them (PipeDream
        and PipeDream-2BW); returns each step's batch-mean loss, the same list on every rank.

        `batches` yields one (inputs, targets) pair per step, every one of the same shape; it
        is read on the ranks of the first stage (inputs) and the last (targets), one step ahead
        at most, and may be None on the others. Step k+1's forwards enter while step k's
        backwards drain, so the pipeline fills once at the start and drains once at the end
        (`pipefold.schedule.stream`); weights update inside the run as the schedule says, with
        PipeDream-2BW's one-step-stale gradients. Call it on every rank with the same `steps`;
        calls may follow each other and `step()` (each call starts and ends drained). See
        docs/schedules.md, "Streaming (asynchronous) runs"."""
        run = self._stream(steps)
        return self._guard.run(lambda: self._train(batches, run))

    def _stream(self, steps: int) -> tuple[StreamProgram, Executor]:
        cached = self._stream_run
        if cached is not None and cached[0].steps == steps:
            return cached
        run = stream_program(self.schedule, steps)  # refusals first, on every rank alike
        self._stream_run = (run, self._new_executor(run.program))
        return self._stream_run

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark this rank as being in phase `name` ("optimizer step", "checkpoint save", ...: one
        of `pipefold.runtime.progress.PHASES`) while the block runs, on every rank alike.

        A peer that is killed or stopped meanwhile is then named with it by the ranks that
        notice (docs/reliability.md); an error in the block that another rank's failure caused
        (a collective that broke because a peer died) is raised as the `PeerFailure` naming that
        peer. `pipefold train` wraps its optimizer step: `with pipe.phase("optimizer step"): opt.step()`.
        """
        with self._guard.phase(name):
            yield

    def set_timeout(self, timeout_s: float) -> None:
        """Change `RuntimeOptions.timeout_s` (the longest any wait for another rank may last) from
        the next wait on; call it on every rank alike, e.g. a generous bound for the first step
        (start-up, warm-up) and a tight one after."""
        self.runtime_options = replace(self.runtime_options, timeout_s=timeout_s)  # checks it
        self._watchdog.set_timeout(float(timeout_s))

    @property
    def executor(self) -> Executor:
        """The executor running this rank's program (see `Executor.intercept`)."""
        return self._executor

    def evaluate(self, inputs: Any, targets: Any) -> float:
        """The batch-mean loss of one batch, forward only (no gradients, no update), on every rank:
        called like `step` on every rank; see pipefold/runtime/evaluate.py."""
        forward_only = ForwardOnly(
            schedule=self.schedule, rank=self.rank, stages=self._stage_of, loss_fn=self._loss_fn,
            boundaries=self._boundaries,
            device=self.device, p2p=self.p2p, collectives=self.collectives,
            data_parallel=self._data_parallel, watchdog=self._watchdog,
        )
        if self.sharding is None:
            return self._guard.contain(lambda: forward_only.run(inputs, targets))
        sharding = self.sharding

        def gathered() -> float:
            sharding.gather_all()  # the forward needs every stage's whole weights
            loss = forward_only.run(inputs, targets)
            sharding.free_all()
            return loss

        return self._guard.contain(gathered)

    def _train(
        self, batches: Iterable[tuple[Any, Any]] | None, run: tuple[StreamProgram, Executor]
    ) -> list[float]:
        (program, executor), schedule = run, self.schedule
        inputs, rows = stream_inputs(
            self.rank, schedule, batches, program.steps, self.transport.collectives, self.device,
            self._boundaries,
        )
        self._begin_updates(rows)
        dropout_steps.next_step()  # one key per run; its micro-batches are numbered across its steps
        stashes = [stage.stash for stage in self.stages if stage.stash is not None]
        for stash in stashes:
            stash.stream(schedule.num_microbatches, program.version_lag)
        self._executor, step_executor = executor, self._executor  # failure reports name its action
        try:
            record = executor.run(inputs)
        finally:
            self._executor = step_executor
        for stash in stashes:
            stash.stream(1, 0)
        self._num_steps_run += program.steps
        self.recorder.use(program.unrolled, program.num_slots)
        try:
            gathered, losses = self._agree_losses(record)
        finally:
            self.recorder.use(schedule, self._timeline_slots)
        if gathered is not None:
            self._last_step = gathered
        if self._data_parallel is not None:
            losses, _ = self._data_parallel.reduce_losses(losses, rows)
        return step_losses(losses, program.steps, schedule.num_microbatches)

    def _report(self, error: BaseException) -> FailureReport:
        replica = self.data_parallel_rank if self.num_data_parallel > 1 else None
        return FailureReport.of(self.rank, self._executor.current, error, replica=replica)

    def _step(self, inputs: Any, targets: Any) -> float:
        collectives = self.transport.collectives
        batch = split_batch(self.rank, self.schedule, inputs, targets, collectives, self.device)
        batch_key, batch_size, sizes = batch.key, batch.size, batch.sizes
        boundaries = batch.boundaries(self._boundaries)
        data_parallel = self._data_parallel
        skip = self.runtime_options.on_nonfinite == "skip"
        scaler = self.loss_scale
        in_schedule = self._begin_updates(batch_size)
        gradients = StepGradients(
            self.parameters,
            TiedGradients((), self.rank, None, self._watchdog) if in_schedule else self.tied,
            None if in_schedule else data_parallel,
            scaler,
            skip=skip,
        )
        count_memory = self._counting.due(batch_key, self._num_steps_run)
        self._num_steps_run += 1
        dropout_steps.next_step()  # seeded dropout's step (pipefold.model.dropout)
        seed = 1.0 if scaler is None else scaler.scale
        if data_parallel is not None:
            data_parallel.begin_step(batch_size)
        if self.sharding is not None and data_parallel is not None:
            # The reduce-scatters run inside the schedule, before the losses are agreed: each
            # replica's backward starts weighted by its share of the global rows, and they sum.
            seed *= data_parallel.weight_of(batch_size)
        with held_casts(self.stages, weights_fixed=self.sharding is None and not in_schedule):
            record = self._executor.run(
                StepInputs(
                    batch.inputs, batch.targets, boundaries, [size / batch_size for size in sizes],
                    loss_scale=seed,
                ),
                count_memory=count_memory,
            )
        peak = self._counting.peak(batch_key, count_memory, record.activation_bytes_peak)
        if peak != record.activation_bytes_peak:  # a copy of the record costs ~10 µs at the step's end
            record = replace(record, activation_bytes_peak=peak)
        gathered, losses = self._agree_losses(record)
        weight = 1.0
        if data_parallel is not None:  # every replica then sees every replica's non-finite losses
            losses, weight = data_parallel.reduce_losses(losses, batch_size)
        bad = gradients.finish(losses, weight, self.device)
        if gathered is not None:
            self._last_step = gathered
        if bad and not skip:
            raise NonFiniteLoss(
                f"the loss of micro-batch(es) {bad} is {losses[bad[0]].item()} (scaled by micro-batch size / "
                f"batch size); the gradients now hold non-finite values: zero them, lower the learning rate "
                f"or check the data, or pass on_nonfinite='skip' to drop such steps"
            )
        loss = float(losses.sum().item())
        self.progress.mark("")
        return loss

    def _agree_losses(self, record: StepRecord) -> tuple[step_gather.GatheredStep | None, Tensor]:
        """Every micro-batch's loss on every rank, and the step's measurements where recorded:
        one all-gather brings both (step_gather.py), else one all-reduce of the losses."""
        if self.runtime_options.record_timeline:
            stashes = (stage.stash for stage in self.stages if stage.stash is not None)
            versions = max((stash.peak_versions_held for stash in stashes), default=1)
            return self.recorder.gather(record, versions)
        collectives = self.transport.collectives
        if collectives is not None:
            collectives.all_reduce_sum(record.losses, what="loss all-reduce")
        return None, record.losses

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


def _default_store() -> Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        logger.warning("no default store: failures of other ranks are only detected by timeout")
        return None
