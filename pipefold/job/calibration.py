"""One launch of `pipefold train`'s pipeline measured at several micro-batch sizes: what
`pipefold plan --profile` calibrates its prices on (`pipefold.cli.plan_calibrate`).

    spawn(calibration_worker, config.schedule.num_processes, (config, (8, 4), 12, "/tmp/cal.json"))

Every rank sets the job up as `pipefold train` does (`pipefold.job.setup.set_up`) and runs
`steps` steps at each micro-batch count as train's loop runs them (the pipeline call, the
gradient norm, the optimizer update), in rounds of one block per count (`blocks`), switching the
running schedule between them (`Pipeline.use_schedule`: the same family, ranks and stages,
fewer and larger micro-batches): a change of the host's load then meets every count alike
instead of passing for a cost that does not grow with rows. Rank 0 writes one JSON file: the
partition and, per micro-batch count, the stage costs its kept steps measured
(`measured_cost_model`, as train's costs.json) and every step's wall and CPU seconds. One
launch for every count: the ranks' start-up (seconds) is paid once.
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
from pipefold.schedule import Schedule
from pipefold.schedule.registry import build
from pipefold.timeline import Timeline

__all__ = ["MAX_ROUNDS", "WARMUP_STEPS", "blocks", "calibration_worker", "check_microbatches"]

WARMUP_STEPS = 2
"""Steps of the first block left out of its costs (allocation, warm-up); a later block, just
switched to, leaves out its first."""

MAX_ROUNDS = 3
"""Rounds over the micro-batch counts at most (`blocks`)."""


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
    if len(set(microbatches)) != len(microbatches):
        raise ConfigError(f"calibration micro-batches {tuple(microbatches)}: give each count once")


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
    schedules = {count: pipe.schedule if index == 0 else build(
        family, num_ranks=pipe.schedule.num_ranks, num_microbatches=count, num_virtual=num_virtual)
        for index, count in enumerate(microbatches)}
    kept: dict[int, list[tuple[float, float, Timeline]]] = {count: [] for count in microbatches}
    walls: dict[int, list[float]] = {count: [] for count in microbatches}
    cpus: dict[int, list[float]] = {count: [] for count in microbatches}
    running: dict[int, Schedule] = {}
    for round_index, block in enumerate(blocks(steps, len(microbatches))):
        for index, count in enumerate(microbatches):
            if round_index or index:
                pipe.use_schedule(schedules[count])
            running[count] = pipe.running_schedule
            # The first step of a block runs a freshly switched order; the very first allocates too.
            skip = WARMUP_STEPS if round_index == 0 and index == 0 else 1
            for step in range(block):
                started, cpu_started = time.perf_counter(), time.process_time()
                _step(job)
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                walls[count].append(wall)
                cpus[count].append(cpu)
                timeline = pipe.last_timeline if job.rank == 0 else None
                if step >= skip and timeline is not None:
                    kept[count].append((wall, cpu, timeline))
    if job.rank == 0:
        phases = []
        for count in microbatches:
            measured = kept[count]
            if not measured:
                raise ConfigError(f"calibration: no step of {count} micro-batches was kept; give more steps")
            costs = measured_cost_model([t for _, _, t in measured], running[count],
                                        step_times=[wall for wall, _, _ in measured])
            phases.append({"num_microbatches": count, "costs": costs.to_json(),
                           "kept_step_seconds": [wall for wall, _, _ in measured],
                           "kept_step_cpu_seconds": [cpu for _, cpu, _ in measured],
                           "step_seconds": walls[count], "step_cpu_seconds": cpus[count]})
        result = {"partition": str(pipe.partition), "batch_size": job.config.batch_size, "phases": phases}
        write_atomic(out, json.dumps(result, indent=1) + "\n")
    dist.barrier()  # peers wait for rank 0's file (as train's report)


def blocks(steps: int, num_sizes: int) -> list[int]:
    """Steps per block of each size, one block per round: `steps` per size cut into up to
    `MAX_ROUNDS` rounds of at least 4 steps, so a change of the host's load between rounds
    meets every size alike (each block's first step, after a switch, is left out)."""
    rounds = max(1, min(MAX_ROUNDS, steps // 4)) if num_sizes > 1 else 1
    return [steps // rounds + (1 if index < steps % rounds else 0) for index in range(rounds)]
