"""The training job: train the built-in GPT on the Python standard library's source.

    pipefold train                          # 2 CPU ranks, 1F1B, 300 steps
    pipefold train --schedule zb-h1 --ranks 4 --steps 50
    torchrun --nproc-per-node 4 -m pipefold train --ranks 4      # one node, GPUs if present

    from pipefold.job.config import load_config, resolve_out_dir
    from pipefold.job.loop import run_local
    run_local(resolve_out_dir(load_config(overrides={"steps": 20})))

`train(config)` runs on EVERY rank (one process per rank, in a process group: `run_local`
spawns them, or start them with torchrun): set up (pipefold.job.setup), then each step
draws the same seeded batch on every rank, runs one pipeline call and, for flush
schedules, one AdamW update; a checkpoint goes to <out>/checkpoint at the end and every
`checkpoint_every` steps. Rank 0 reports (pipefold.job.report).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch.distributed as dist
from rich.console import Console

from pipefold.errors import NonFiniteLoss, PipelineError
from pipefold.job.config import CHECKPOINT_DIR, TrainConfig
from pipefold.job.outcome import name_the_step, record_failure
from pipefold.job.outdir import check_out_dir
from pipefold.job.report import StepStats, TrainResult, describe, finish, gather, progress
from pipefold.job.retune import Retuner
from pipefold.job.setup import check_resume, set_up
from pipefold.runtime.checkpoint import save_checkpoint
from pipefold.runtime.processes.launch import LaunchResult, spawn
from pipefold.timeline import Timeline

__all__ = ["run_local", "train", "train_worker"]

_NUM_COST_STEPS = 10
"""The report's prediction uses the stage costs measured over this many final steps."""


def train(config: TrainConfig, *, console: Console | None = None) -> TrainResult:
    """Run the job on this rank; call it on every rank.

    Joins the process group from torchrun's variables unless already in one.
    `console` is used on rank 0 only (progress bar and final report); None is silent.
    """
    job = set_up(config)
    pipe, optimizer, scheduler = job.pipe, job.optimizer, job.scheduler
    report = console if job.rank == 0 else None
    if report is not None:
        if config.resume:
            report.print(f"resumed from {config.resume} at step {job.start_step}")
        report.print(describe(job))
        if job.searched is not None:
            report.print(job.searched)

    tokens_per_step = config.batch_size * config.model.seq_len
    records: list[StepStats] = []
    retuner = Retuner(pipe, config.schedule.retune_every, report) if config.schedule.retune_every else None
    recent: collections.deque[Timeline] = collections.deque(maxlen=_NUM_COST_STEPS)
    checkpoint = Path(config.out) / CHECKPOINT_DIR
    step = job.start_step
    recorded = _recorded(config, records, job.rank, lambda: step)
    with progress(report, config.steps - job.start_step) as update, recorded:
        for step in range(job.start_step, config.steps):
            inputs, targets = job.next_batch()
            started = time.perf_counter()
            try:
                loss = pipe.step(inputs, targets)
            except NonFiniteLoss as error:
                raise name_the_step(error, step + 1) from None
            if optimizer is not None and scheduler is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            seconds = time.perf_counter() - started
            timeline = _last_timeline(pipe.last_timeline)
            recent.append(timeline)
            record = StepStats(
                step, float(loss), seconds, tokens_per_step / seconds, timeline.bubble_fraction
            )
            records.append(record)
            update(record)
            done = step + 1
            if retuner is not None and retuner.due(done, config.steps):
                if retuner.after_steps(done, list(recent), [r.seconds for r in records]):
                    recent.clear()  # the report's prediction is of the order now running: its steps only
            if done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
                save_checkpoint(
                    pipe, checkpoint, optimizer=job.optimizers, step=done, extra={"config": config.to_dict()}
                )

    gathered = gather(job, recent[-1] if recent else None)
    result = TrainResult(steps=records)
    if job.rank == 0 and gathered.state is not None:
        result = finish(
            job, gathered.state, list(recent), records, report, gathered.memory,
            retuner.changes if retuner is not None else [],
        )
    # Peers wait for rank 0's report: a rank that exits first tears down its gloo
    # connections under rank 0, which some torch builds answer with an abort.
    dist.barrier()
    return result


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
    """Spawn `ranks x data_parallel x tensor_parallel` local workers running `train_worker`."""
    check_resume(config)
    check_out_dir(config)
    return spawn(train_worker, config.schedule.num_processes, (config, show))


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


def _last_timeline(timeline: Timeline | None) -> Timeline:
    if timeline is None:
        # Pipeline records a timeline after every step unless built with record_timeline=False.
        raise PipelineError(
            "the pipeline recorded no timeline for the last step; build it with record_timeline=True"
        )
    return timeline
