"""The training job: train the built-in GPT on the Python standard library's source.

    pipefold train                          # 2 CPU ranks, 1F1B, 300 steps
    pipefold train --schedule zb-h1 --ranks 4 --steps 50
    torchrun --nproc-per-node 4 -m pipefold train --ranks 4      # one node, GPUs if present

    from pipefold.job.config import load_config
    from pipefold.job.outdir import resolve_out_dir
    from pipefold.job.loop import run_local
    run_local(resolve_out_dir(load_config(overrides={"steps": 20})))

`train(config)` runs on EVERY rank (one process per rank, in a process group: `run_local`
spawns them, or start them with torchrun): set up (pipefold.job.setup), then each step
draws the same seeded batch on every rank, runs one pipeline call (`grad_accumulation` of them,
their gradients averaged) and, for flush schedules, measures (and optionally clips) the global
gradient norm and makes one AdamW update; a checkpoint goes to <out>/checkpoint at the end and every
`checkpoint_every` steps. Rank 0 reports (pipefold.job.report). A Hugging Face model
(model.path) is also saved in its own format into <out>/hf at the end, each pipeline rank
writing the shard of its own layers.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch.distributed as dist
from rich.console import Console
from torch import Tensor

from pipefold.errors import NonFiniteLoss, PipelineError
from pipefold.hf.model import finish_save, save_causal_lm, state_dict_of
from pipefold.job.allocator_peaks import allocator_peaks, held_bytes
from pipefold.job.config import CHECKPOINT_DIR, HF_DIR, TrainConfig
from pipefold.job.metrics import MetricsWriter
from pipefold.job.optim import accumulated_step, apply_update
from pipefold.job.outcome import name_the_step, record_failure
from pipefold.job.outdir import check_out_dir
from pipefold.job.recovery import RESTART_ENV, die, exit_step, resume_after_restart
from pipefold.job.report import (
    StepStats,
    TrainResult,
    describe,
    finish,
    gather,
    progress,
    validation_batches,
)
from pipefold.job.retune import Retuner
from pipefold.job.rng import gather_rng_states
from pipefold.job.setup import RNG_KEY, Job, check_resume, set_up, shard_rows
from pipefold.job.streaming import Streams
from pipefold.model.dropout import dropout_steps, replica_seed
from pipefold.plan.estimate import model_flops_utilization
from pipefold.runtime import native
from pipefold.runtime.checkpoint import save_checkpoint
from pipefold.runtime.checkpoint_async import AsyncCheckpointer
from pipefold.runtime.parallel.tensor_parallel import whole
from pipefold.runtime.processes.launch import LaunchResult, spawn
from pipefold.timeline import Timeline

logger = logging.getLogger(__name__)

__all__ = ["run_local", "train", "train_worker"]

_NUM_COST_STEPS = 10
"""The report's prediction uses the stage costs measured over this many final steps."""


def train(config: TrainConfig, *, console: Console | None = None) -> TrainResult:
    """Run the job on this rank; call it on every rank.

    Joins the process group from torchrun's variables unless already in one.
    `console` is used on rank 0 only (progress bar and final report); None is silent.
    """
    config = resume_after_restart(config)
    job = set_up(config)
    # Seeded dropout (model.attention = "unfused") draws per pipeline call: a resumed run goes on
    # from the calls its steps made; each data-parallel replica draws its own masks.
    dropout_steps.start_at(replica_seed(config.seed, job.pipe.data_parallel_rank),
                           job.start_step * config.grad_accumulation)
    pipe, optimizer, scheduler = job.pipe, job.optimizer, job.scheduler
    report = console if job.rank == 0 else None
    if report is not None:
        if config.resume:
            report.print(f"resumed from {config.resume} at step {job.start_step}")
        report.print(describe(job))
        if job.searched is not None:
            report.print(job.searched)

    clip = config.clip_norm
    peak_flops = config.peak_flops
    flops_per_token = config.flops_per_token
    records: list[StepStats] = []
    retuner = Retuner(pipe, config.schedule.retune_every, report) if config.schedule.retune_every else None
    recent: collections.deque[Timeline] = collections.deque(maxlen=_NUM_COST_STEPS)
    checkpoint = Path(config.out) / CHECKPOINT_DIR
    held_out = (
        job.corpus.val if job.corpus is not None else job.tokens.val if job.tokens is not None else None
    )
    val_batches = validation_batches(config, held_out) if config.eval_every and held_out is not None else []
    step = job.start_step
    recorded = _recorded(config, records, job.rank, lambda: step)
    fault_step = exit_step(job.rank)
    saver = AsyncCheckpointer(pipe) if config.async_checkpoint else None
    # schedule.streaming: runs of steps overlap in one pipeline call (pipefold.job.streaming).
    streams = Streams(job, stops=(fault_step,)) if config.schedule.streaming else None
    metrics = MetricsWriter(Path(config.out), append=bool(config.resume)) if job.rank == 0 else None
    # On CUDA, the allocator's peaks over the kept steps (pipefold.job.allocator_peaks); on CPU
    # with memory_peaks, the profiler's record of them; None elsewhere.
    held_before = (lambda: held_bytes(pipe, job.optimizers)) if config.memory_peaks else None
    peaks = allocator_peaks(job.device, config.steps - job.start_step, profile_cpu=held_before)
    if peaks is not None:
        peaks.before_steps()
    with progress(report, config.steps - job.start_step) as update, recorded, _closing(metrics):
        for step in range(job.start_step, config.steps):
            if step == fault_step:
                die()  # test-only (pipefold.job.recovery.FAULT_ENV)
            batches = (
                [job.next_batch() for _ in range(config.grad_accumulation)]
                if streams is None
                else streams.batches(step)
            )
            # Bucketed by length (data.bucket_by_length), every step has its own tokens; every
            # replica holds an equal shard of the global batch.
            tokens_per_step = sum(inputs.numel() for inputs, _ in batches) * pipe.num_data_parallel
            seq_len = max(inputs.shape[1] for inputs, _ in batches) if config.data.bucket_by_length else None
            if peaks is not None:  # outside the timed step: a reset and a read of the allocator
                peaks.step_begins()
            started, cpu_started = time.perf_counter(), time.process_time()
            scaler = pipe.loss_scale
            skipped_before = 0 if scaler is None else scaler.num_skipped
            loss_scale = None if scaler is None else scaler.scale
            # --adaptive: each batch's micro-batches, family and recomputation (job/adaptive.py).
            switches_before = job.adaptive.num_switches if job.adaptive is not None else 0
            try:
                loss = (
                    accumulated_step(pipe, batches, job.adaptive) if streams is None else streams.loss(step)
                )
            except NonFiniteLoss as error:
                raise name_the_step(error, step + 1) from None
            if peaks is not None:
                peaks.pipeline_done()
            # fp16: a batch that overflowed on any rank was dropped on every rank; so is the update.
            skipped = scaler is not None and scaler.num_skipped > skipped_before
            grad_norm: float | None = None
            lr: float | None = None
            if optimizer is not None and scheduler is not None:
                lr = float(optimizer.param_groups[0]["lr"])
                grad_norm = apply_update(pipe, optimizer, scheduler, clip, skipped=skipped)
            seconds = time.perf_counter() - started if streams is None else streams.seconds
            cpu_seconds = time.process_time() - cpu_started if streams is None else None
            if peaks is not None:  # before the step's validation and checkpoint, which are no part of it
                peaks.step_ends()
            timeline = _last_timeline(pipe.last_timeline)
            if job.adaptive is not None and job.adaptive.num_switches != switches_before:
                recent.clear()  # the report's prediction is of the choice now running: its steps only
            if streams is None or streams.started:  # a stream's steps share its timeline
                recent.append(timeline)
            done = step + 1
            eval_loss = None
            if config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                eval_loss = evaluate(job, val_batches)
            tokens_per_s = tokens_per_step / seconds
            record = StepStats(
                step, float(loss), seconds, tokens_per_s, timeline.bubble_fraction,
                grad_norm=grad_norm, lr=lr, eval_loss=eval_loss, loss_scale=loss_scale, skipped=skipped,
                mfu=None if peak_flops is None else model_flops_utilization(
                    flops_per_token, tokens_per_s, peak_flops
                ),
                seq_len=seq_len,
                activation_bytes_peak=tuple(timeline.activation_bytes_peak), cpu_seconds=cpu_seconds,
            )
            records.append(record)
            if metrics is not None:
                metrics.write(record)
            update(record)
            if retuner is not None and retuner.due(done, config.steps):
                if retuner.after_steps(done, list(recent), [r.seconds for r in records]):
                    recent.clear()  # the report's prediction is of the order now running: its steps only
            if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
                # Every rank's random states too: a run resumed here draws the same dropout
                # masks and batches as this one.
                extra = {"config": config.to_dict(), RNG_KEY: gather_rng_states(job.sampler, job.device)}
                if saver is not None:
                    saver.save(checkpoint, optimizer=job.optimizers, step=done, extra=extra)
                else:
                    save_checkpoint(pipe, checkpoint, optimizer=job.optimizers, step=done, extra=extra)
        if saver is not None:
            saver.wait()  # the last checkpoint is in place before the run reports or ends

    if job.hf is not None:
        save_hf(job)
    gathered = gather(job, recent[-1] if recent else None, peaks.summary() if peaks is not None else {})
    result = TrainResult(steps=records)
    if job.rank == 0 and gathered.state is not None:
        result = finish(
            job, gathered.state, list(recent), records, report, gathered.memory,
            retuner.changes if retuner is not None else [],
            stream=None if streams is None else (streams.schedule(), streams.seconds * streams.steps),
        )
    # Peers wait for rank 0's report: a rank that exits first tears down its gloo
    # connections under rank 0, which some torch builds answer with an abort.
    dist.barrier()
    return result


def save_hf(job: Job) -> Path:
    """Every rank: write the trained Hugging Face model into <out>/hf, `from_pretrained`-ready.

    Replica 0's pipeline ranks each write the shard of the layers they hold; world rank 0 then
    writes the index, config.json and the tokenizer files, and moves the directory into place.
    """
    assert job.hf is not None
    config, pipe = job.config, job.pipe
    target = Path(config.out) / HF_DIR
    staging = target.parent / f".{target.name}.partial"
    if job.rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # shards of an earlier, interrupted save
    dist.barrier()
    if pipe.data_parallel_rank == 0:
        # Row-major (dp, pp, tp) world ranks. Tensor-parallel shards are gathered whole (a
        # collective: every tp rank of the stage, in the same order); tp rank 0 writes them.
        tp = config.schedule.tensor_parallel
        pipeline_rank = (job.rank // tp) % config.schedule.ranks
        owned = state_dict_of(job.layers, owned=pipe.local_modules.keys())
        state = {name: whole(tensor) for name, tensor in owned.items()}
        if job.rank % tp == 0:
            save_causal_lm(state, target, job.hf.config, shard=(pipeline_rank, config.schedule.ranks))
    dist.barrier()
    if job.rank == 0:
        finish_save(target, job.hf.config, tokenizer_dir=job.hf.files.config_path.parent)
    return target


def train_worker(config: TrainConfig, show: bool = True) -> None:
    """Entry point of one spawned rank: rank 0 reports to the terminal when `show`."""
    try:
        train(config, console=Console() if show else None)
    finally:
        # The Pipeline sits in reference cycles that hold the rendezvous store; if they
        # are only freed at interpreter exit, rank 0's TCPStore server is destroyed during
        # static teardown and the process aborts ("terminate called without an active
        # exception", exit -6) after a successful run. Collect them while torch is alive.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(config: TrainConfig, *, show: bool = True) -> LaunchResult:
    """Spawn `ranks x data_parallel x tensor_parallel` local workers running `train_worker`.

    Where a rank fails, all ranks are restarted up to `config.max_restarts` times; each restart
    resumes from the latest checkpoint in <out>/checkpoint (pipefold.job.recovery).
    """
    check_resume(config)
    check_out_dir(config)
    native.build_for(config.schedule.built)  # once per machine, before the ranks load it
    result = spawn(train_worker, config.schedule.num_processes, (config, show))
    for restart in range(1, config.max_restarts + 1):
        if result.ok or result.interrupted:
            break
        logger.warning(
            "%s; restarting all ranks (%d of %d) from the latest checkpoint",
            result.describe(), restart, config.max_restarts,
        )
        result = spawn(
            train_worker, config.schedule.num_processes, (config, show), env={RESTART_ENV: str(restart)}
        )
    return result


def evaluate(job: Job, batches: list[tuple[Tensor, Tensor]]) -> float:
    """The mean validation loss of `batches` through the pipeline, forward only, on every rank
    (with dropout off)."""
    modules = list(job.pipe.local_modules.values())
    for module in modules:
        module.eval()
    try:
        losses = [
            job.pipe.evaluate(*shard_rows(batch, job.pipe.data_parallel_rank, job.pipe.num_data_parallel))
            for batch in batches
        ]
    finally:
        for module in modules:
            module.train()
    return sum(losses) / len(losses)


@contextlib.contextmanager
def _recorded(
    config: TrainConfig, records: list[StepStats], rank: int, step: Callable[[], int]
) -> Iterator[None]:
    """A run that stops on an error still leaves summary.json, with the error (pipefold.job.outcome)."""
    try:
        yield
    except BaseException as error:
        record_failure(config, records, step() + 1, error, rank=rank)
        raise


@contextlib.contextmanager
def _closing(metrics: MetricsWriter | None) -> Iterator[None]:
    try:
        yield
    finally:
        if metrics is not None:
            metrics.close()


def _last_timeline(timeline: Timeline | None) -> Timeline:
    if timeline is None:
        # Pipeline records a timeline after every step unless built with record_timeline=False.
        raise PipelineError(
            "the pipeline recorded no timeline for the last step; build it with record_timeline=True"
        )
    return timeline
