"""One benchmark rank: runs every configuration of the matrix inside one process group.

The ranks start once (torch's import and gloo's rendezvous are paid once); for each
configuration every side is built, its gradients are checked against one process,
then it is warmed up and timed, the sides alternating step by step (A B C A B C) so that
slow drifts of the machine hit them alike; the third side is the efficiency baseline
(one process, 1 thread, on rank 0; see single_side.py). Rank 0 sends each configuration's result
to the parent through `queue`.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.harness.deepspeed_side import DeepSpeedSide
from benchmarks.harness.link import measure_link
from benchmarks.harness.pipefold_side import PipefoldSide
from benchmarks.harness.quiet import CpuCounters, foreign_share, read_cpu_counters
from benchmarks.harness.reference import GradientMismatch, check_gradients, reference_gradients
from benchmarks.harness.results import BenchConfig, ConfigResult, RunOptions, SideResult
from benchmarks.harness.rss import peak_rss_bytes, reset_peak_rss
from benchmarks.harness.sides import Side
from benchmarks.harness.single_side import SingleProcessSide
from benchmarks.harness.torch_side import TorchSide
from benchmarks.harness.workloads import Workload, workload
from pipefold.errors import PipefoldError
from pipefold.runtime.processes.orphan import die_with_parent

__all__ = ["worker_main"]

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def worker_main(
    rank: int, num_ranks: int, port: int, configs: list[BenchConfig], options: RunOptions, queue: Any
) -> None:
    """Entry point of a spawned rank; it does not outlive the harness that spawned it.

    Rank 0 puts ("link", {...}) once, then ("result", json) per configuration on `queue`.
    """
    # The parent's stdout carries one JSON line per configuration; whatever the libraries print
    # in the ranks (DeepSpeed prints its topology and build messages) goes to stderr instead.
    die_with_parent()
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # One thread per rank: the ranks already fill the cores, and more threads were slower.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=num_ranks,
        timeout=timedelta(seconds=options.timeout_s),
    )
    try:
        latency, bandwidth = measure_link(rank)
        if rank == 0:
            queue.put(("link", {"latency_s": latency, "bandwidth_bytes_per_s": bandwidth}))
        references: dict[str, dict[str, torch.Tensor]] = {}
        for config in configs:
            result = run_config(config, options, rank, num_ranks, references)
            if rank == 0:
                queue.put(("result", result.to_json()))
    finally:
        # Collect the last configuration's pipelines (and their communication helpers) while
        # the process group they use still exists.
        gc.collect()
        dist.destroy_process_group()


def run_config(
    config: BenchConfig,
    options: RunOptions,
    rank: int,
    num_ranks: int,
    references: dict[str, dict[str, torch.Tensor]],
) -> ConfigResult:
    work = workload(config.workload)
    batch = work.make_batch(options.seed)
    if config.workload not in references:
        references[config.workload] = reference_gradients(work, work.build_layers(options.seed), *batch)
    result = ConfigResult(config)
    sides: list[Side] = []
    for label in options.libraries:
        side, error = _build_side(label, work, config, options, rank, num_ranks, batch)
        error = _first_error(error)
        if side is None and error is None:
            continue  # not applicable (DeepSpeed beside a schedule it does not have)
        result.sides[label] = SideResult(label=label, error=error)
        if side is not None and error is None:
            sides.append(side)
    for side in list(sides):
        error, worst = _check(side, batch, references[config.workload])
        result.sides[side.label].grad_max_abs_err = worst
        if error is not None:
            result.sides[side.label].error = error
            sides.remove(side)
    if not sides:
        result.skipped = "; ".join(f"{s.label}: {s.error}" for s in result.sides.values())
        return result
    if options.interleave_baseline:
        # The reference itself: no gradient check; timed in the same alternation (single_side.py).
        baseline = SingleProcessSide(
            work, work.build_layers(options.seed), rank=rank, num_microbatches=config.num_microbatches
        )
        result.sides[baseline.label] = SideResult(label=baseline.label)
        sides.append(baseline)
    for _ in range(options.warmup_steps):
        for side in sides:
            side.zero_grad()
            side.step(*batch)
    for side in sides:
        calibrated = getattr(side, "calibrated_prediction", None)
        if calibrated is not None and options.warmup_steps > 0:
            result.sides[side.label].calibrated_prediction_s = calibrated()
    for _ in range(options.timed_steps):
        for side in sides:
            _timed_step(side, batch, options, rank, num_ranks, result.sides[side.label])
    for side in sides:
        counted = side.activation_bytes_peak()
        gathered: list[Any] = [None] * num_ranks
        dist.all_gather_object(gathered, counted)
        result.sides[side.label].activation_bytes_peak = list(gathered)
        if rank == 0:
            result.sides[side.label].timeline = side.timeline_json()
            searched = getattr(side, "searched_schedule_json", None)
            if searched is not None:
                result.sides[side.label].schedule = searched()
    return result


def _build_side(
    label: str,
    work: Workload,
    config: BenchConfig,
    options: RunOptions,
    rank: int,
    num_ranks: int,
    batch: Batch,
) -> tuple[Side | None, str | None]:
    """Construct one library's pipeline; a refusal becomes an error string, not an exception."""
    layers = work.build_layers(options.seed)
    schedule_pair = config.pair
    if label != "pipefold" and schedule_pair.torch_class is None:
        return None, None  # a pipefold-only row (docs/decisions.md, "pipefold-only rows")
    try:
        if label == "pipefold":
            return PipefoldSide(
                work,
                layers,
                schedule_pair,
                num_ranks=num_ranks,
                num_microbatches=config.num_microbatches,
                probe_batch=batch,  # a searched row tunes on the batch it is timed on
            ), None
        if label == "torch":
            refusal = schedule_pair.peer_refusal(num_ranks, config.num_microbatches)
            if refusal is not None:
                return None, refusal
            return TorchSide(
                work,
                layers,
                schedule_pair,
                rank=rank,
                num_ranks=num_ranks,
                num_microbatches=config.num_microbatches,
            ), None
        if label == "deepspeed":
            ds_side, ds_error = DeepSpeedSide.create(work, layers, config, num_ranks=num_ranks)
            return ds_side, ds_error
    except (ValueError, RuntimeError, TypeError, ImportError) as error:
        # Constructors check their arguments identically on every rank, so all ranks agree.
        return None, f"{type(error).__name__}: {error}"
    return None, f"unknown library {label!r}"


def _first_error(local: str | None) -> str | None:
    """Agree across ranks: the first rank's error, if any rank has one."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return next((error for error in gathered if error is not None), None)


def _check(
    side: Side, batch: Batch, reference: dict[str, torch.Tensor]
) -> tuple[str | None, float]:
    """One step from zero gradients, compared with one process.

    Returns the mismatch (agreed by all ranks) and the largest absolute error over ranks.
    """
    side.zero_grad()
    check_step = getattr(side, "check_step", None)
    local: str | None = None
    worst = 0.0
    try:
        if check_step is not None:
            check_step(*batch)  # a library that zeroes its own gradients (DeepSpeed)
        else:
            side.step(*batch)
        worst = check_gradients(side.label, side.gradients(), reference)
    except GradientMismatch as error:
        local = f"rank {dist.get_rank()}: {error}"
    except PipefoldError as error:
        # pipefold stops every rank on a failure (or times out waiting), so all ranks land
        # here together and the run goes on with the next configuration.
        local = f"rank {dist.get_rank()}: {type(error).__name__}: {error}"
    worsts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(worsts, worst)
    return _first_error(local), max(float(value) for value in worsts)


def _timed_step(
    side: Side, batch: Batch, options: RunOptions, rank: int, num_ranks: int, record: SideResult
) -> None:
    """Time one step; retake it while the machine was busy with other work, up to the gate's limit."""
    for attempt in range(options.gate.max_retries + 1):
        step_s, share, rss = _window(side, batch, rank, num_ranks)
        quiet = options.gate.is_quiet(share)
        if quiet or attempt == options.gate.max_retries:
            break
        record.num_retakes += 1
        logger.debug("%s: window disturbed (foreign share %.2f), retaking", side.label, share)
    record.samples_s.append(step_s)
    record.foreign_shares.append(share)
    record.num_disturbed += 0 if quiet else 1
    if not record.peak_rss_bytes:
        record.peak_rss_bytes = [0] * num_ranks
    record.peak_rss_bytes = [max(old, new) for old, new in zip(record.peak_rss_bytes, rss, strict=True)]


def _window(side: Side, batch: Batch, rank: int, num_ranks: int) -> tuple[float, float, list[int]]:
    """(step seconds = slowest rank, foreign CPU share, peak RSS per rank) of one step."""
    side.zero_grad()
    reset_peak_rss()
    dist.barrier()
    machine_before = read_cpu_counters() if rank == 0 else None
    cpu_before = time.process_time()
    start = time.perf_counter()
    side.step(*batch)
    elapsed = time.perf_counter() - start
    # The second barrier closes the window only when every rank is done, so the machine
    # counters and every rank's CPU time cover the same interval.
    dist.barrier()
    own_cpu = time.process_time() - cpu_before
    machine = CpuCounters(0.0, 0.0)
    machine_after = read_cpu_counters() if rank == 0 else None
    if machine_before is not None and machine_after is not None:
        machine = machine_after - machine_before
    row = torch.tensor(
        [elapsed, own_cpu, machine.busy_s, machine.total_s, float(peak_rss_bytes())], dtype=torch.float64
    )
    rows = [torch.empty_like(row) for _ in range(num_ranks)]
    dist.all_gather(rows, row)
    step_s = max(float(r[0]) for r in rows)
    own_total = sum(float(r[1]) for r in rows)
    counters = CpuCounters(float(rows[0][2]), float(rows[0][3]))
    return step_s, foreign_share(counters, own_total), [int(r[4]) for r in rows]
