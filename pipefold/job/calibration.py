"""One launch of `pipefold train`'s pipeline measured at several micro-batch sizes: what
`pipefold plan --profile` calibrates its prices on (`pipefold.cli.plan_calibrate`).

    spawn(calibration_worker, config.schedule.num_processes, (config, (8, 4), 12, "/tmp/cal.json"))

Every rank sets the job up as `pipefold train` does (`pipefold.job.setup.set_up`), runs `steps`
steps as train's loop runs them (the pipeline call, the gradient norm, the optimizer update), then
switches the running schedule to the next micro-batch count (`Pipeline.use_schedule`: the same
family, ranks and stages, fewer and larger micro-batches) and runs `steps` more, and so on. Rank 0
writes one JSON file: the partition and, per micro-batch count, the stage costs the steps after
the first `WARMUP_STEPS` measured (`measured_cost_model`, as train's costs.json) and every step's
wall and CPU seconds. One launch for every point: the ranks' start-up (seconds) is paid once.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pipefold.errors import ConfigError
from pipefold.files import write_atomic
from pipefold.job.config import TrainConfig
from pipefold.job.optim import accumulated_step
from pipefold.job.setup import Job, set_up
from pipefold.runtime.measured import measured_cost_model
from pipefold.schedule.registry import build

__all__ = ["WARMUP_STEPS", "calibration_worker", "check_microbatches"]

WARMUP_STEPS = 2
"""Steps of each micro-batch count left out of its costs: the first allocates, or (after a switch)
builds the executor's tables for the new order."""


def check_microbatches(config: TrainConfig, microbatches: Sequence[int], steps: int) -> None:
    """Refuse what `calibration_worker` cannot run, before any rank starts."""
    if not microbatches or microbatches[0] != config.schedule.num_microbatches:
        raise ConfigError(
            f"calibration micro-batches {tuple(microbatches)}: start with the pipeline's own "
            f"{config.schedule.num_microbatches} (its transport is sized for the first)"
        )
    if any(count < 1 or count > microbatches[0] for count in microbatches):
        raise ConfigError(
            f"calibration micro-batches {tuple(microbatches)}: give counts from 1 to the first, "
            f"{microbatches[0]} (a running pipeline switches only to as many or fewer)"
        )
    if steps <= WARMUP_STEPS:
        raise ConfigError(f"calibration steps = {steps}; give more than {WARMUP_STEPS} per micro-batch count")


def calibration_worker(config: TrainConfig, microbatches: Sequence[int], steps: int, out: str) -> None:
    """Entry point of one spawned rank (every rank calls it)."""
    try:
        _calibrate(set_up(config), microbatches, steps, Path(out))
    finally:
        gc.collect()  # as train_worker: the pipeline's cycles hold the rendezvous store
        if dist.is_initialized():
            dist.destroy_process_group()


def _step(job: Job) -> None:
    """One step as `pipefold train`'s loop runs it (no streaming, no adaptive choice)."""
    pipe, optimizer, scheduler = job.pipe, job.optimizer, job.scheduler
    accumulated_step(pipe, [job.next_batch() for _ in range(job.config.grad_accumulation)])
    if optimizer is not None and scheduler is not None:
        clip = job.config.clip_norm
        if clip:
            pipe.clip_grad_norm_(clip)
        else:
            pipe.gradient_scope().total_norm()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def _calibrate(job: Job, microbatches: Sequence[int], steps: int, out: Path) -> None:
    pipe = job.pipe
    family = job.config.schedule.name
    num_virtual = pipe.schedule.num_stages // pipe.schedule.num_ranks
    phases: list[dict[str, Any]] = []
    for index, count in enumerate(microbatches):
        if index:
            pipe.use_schedule(build(family, num_ranks=pipe.schedule.num_ranks, num_microbatches=count,
                                    num_virtual=num_virtual))
        walls, cpus, timelines = [], [], []
        for _ in range(steps):
            started, cpu_started = time.perf_counter(), time.process_time()
            _step(job)
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu_started)
            timelines.append(pipe.last_timeline)
        if job.rank == 0:
            kept = [timeline for timeline in timelines[WARMUP_STEPS:] if timeline is not None]
            costs = measured_cost_model(kept, pipe.running_schedule, step_times=walls[WARMUP_STEPS:])
            phases.append({"num_microbatches": count, "costs": costs.to_json(), "step_seconds": walls,
                           "step_cpu_seconds": cpus})
    if job.rank == 0:
        result = {"partition": str(pipe.partition), "batch_size": job.config.batch_size,
                  "warmup_steps": WARMUP_STEPS, "phases": phases}
        write_atomic(out, json.dumps(result, indent=1) + "\n")
    dist.barrier()  # peers wait for rank 0's file (as train's report)
