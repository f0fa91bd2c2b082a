"""One launch of `pipefold train`'s pipeline measured at several micro-batch sizes: what
`pipefold plan --profile` calibrates its prices on (`pipefold.cli.plan_calibrate`).

    spawn(calibration_worker, config.schedule.num_processes,
          (config, parse_sizes("8,4,2,32,32x1"), 12, "/tmp/cal.json", "1f1b+split", "gpipe", "zb-h1"))

Every rank sets the job up as `pipefold train` does (`pipefold.job.setup.set_up`) and runs
`steps` steps at each size (`CalibrationSize`: a micro-batch count of the whole batch, or of a
slice of it: 32x1 runs the batch's first 32 rows as 32 one-row micro-batches) as train's loop
runs them (the pipeline call, the
gradient norm, the optimizer update; the batch drawn before the clock starts, as the loop draws
it, so a step here and a step of train's summary time the same work), in rounds of one block per
count (`blocks`), switching the running schedule between them (`Pipeline.use_schedule`: the
same family, ranks and stages, as many or fewer micro-batches than the pipeline is built with, so
it is built for the most of them and the first, the reference, is switched to before its first
step): a change of the host's load
then meets every count alike
instead of passing for a cost that does not grow with rows. Rank 0 writes one JSON file: the
partition and, per size, its micro-batch count and rows per micro-batch, the stage costs its
kept steps measured (`measured_cost_model`, as train's costs.json) and every step's wall and CPU
seconds, and the gaps its ranks left after an action whose output went to another rank against
after the others (`measured_send_gaps`: what a send costs its sender). A slice's step runs fewer
rows than train's, and its update is of their gradient: the loss is the slice's mean (each
micro-batch's loss weighted by its share of the step's rows, as any batch), so the update is as
large as a whole batch's and nothing needs rescaling; its actions are what the fit uses. One
launch for every count: the ranks' start-up (seconds) is paid once.

With a split family (`SPLIT_FAMILY`: 1F1B with every B run as I then W in its place), each round
also runs a short block of it at the first count on the same stages (`split_blocks`), so the
file's "split_phase" holds the I and W the planner's split-backward schedules pay: 1F1B never
splits its backward. With a held family (`HELD_FAMILY`, GPipe), each round also runs a short
block of it at the first count on the same stages (as short as the split's), so the file's
"held_phase" measures the same layers, calls and messages while the ranks hold every
micro-batch's activations; with a curve family (`CURVE_FAMILY`, zb-h1, whose later ranks hold a
little more than in 1F1B) one more such block, the file's "curve_phase": the points the
planner's held-memory curve is fitted on (`pipefold.plan.held_cost`), at large and at small
excesses. The split block holds what 1F1B holds, so its I and W carry no held slowdown. Where
the run's second size has twice the first's rows (`curve_rows_size`), one more curve block runs
at it, right after that size's 1F1B block (as short: 6 steps at the defaults), the file's
"curve_rows_phase": its W prices how a deferred W's extra grows with the rows.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor

from pipefold.errors import ConfigError
from pipefold.files import write_atomic
from pipefold.job.calibration_size import CalibrationSize
from pipefold.job.config import TrainConfig
from pipefold.job.optim import accumulated_step, apply_update
from pipefold.job.setup import Job, set_up
from pipefold.runtime import native
from pipefold.runtime.measured import measured_cost_model
from pipefold.runtime.send_gaps import measured_send_gaps
from pipefold.schedule import Op, Schedule
from pipefold.schedule.split_backward import build_named
from pipefold.timeline import Timeline

__all__ = ["CURVE_FAMILY", "HELD_FAMILY", "MAX_ROUNDS", "SPLIT_FAMILY", "WARMUP_STEPS", "blocks",
           "build_graph_walk", "calibration_worker", "check_curve", "check_held", "check_sizes",
           "check_split", "curve_rows_size", "split_blocks"]

WARMUP_STEPS = 2
"""Steps of the first block left out of its costs (allocation, warm-up); a later block, just
switched to, leaves out its first."""

MAX_ROUNDS = 3
"""Rounds over the micro-batch counts at most (`blocks`)."""

SPLIT_FAMILY = "1f1b+split"
"""The split-backward order of the split phase: 1F1B's stages, placement and order with each B run
as I then W in its place (`pipefold.schedule.split_backward`), so the run measures what the
planner's split schedules pay for the split itself and nothing else: the ranks hold what 1F1B
holds. (zb-h1, the phase's family before, defers W on its later ranks, which then hold more and
run slower for it: a slowdown the split's seconds could not be told from.)"""

CURVE_FAMILY = "zb-h1"
"""The family of the curve phase: 1F1B's stages and placement, its later ranks holding a little
more than in 1F1B (W deferred), its first no more: the held-memory curve's points at small
excesses (GPipe's are 4-8x 1F1B's), and the host's drift between the blocks from its first rank.
Only its F is used (its I and W carry the split's own seconds)."""


HELD_FAMILY = "gpipe"
"""The family of the held phase: 1F1B's stages, placement and actions, every micro-batch's
activations held at once (4-8x 1F1B's on 2 ranks at 8 micro-batches)."""


def check_sizes(config: TrainConfig, sizes: Sequence[CalibrationSize], steps: int) -> None:
    """Refuse what `calibration_worker` cannot run, before any rank starts."""
    named = ",".join(map(str, sizes))
    if not sizes:
        raise ConfigError("calibration --microbatches is empty; give one or more sizes (the first is the "
                          "reference the others are compared with)")
    most = max(size.num_microbatches for size in sizes)
    if most != config.schedule.num_microbatches:
        raise ConfigError(
            f"calibration --microbatches {named}: build the pipeline for the most of them, "
            f"{most}, not {config.schedule.num_microbatches} (train's --microbatches): its "
            "transport is sized for the count it is built with, and a running pipeline switches only to "
            "as many or fewer"
        )
    if steps <= WARMUP_STEPS:
        raise ConfigError(f"calibration steps = {steps}; give more than {WARMUP_STEPS} per micro-batch count")
    # Each replica's rows of the batch (`Job.next_batch`): what a step cuts or slices.
    batch_rows = config.batch_size // config.schedule.data_parallel
    for size in sizes:
        if size.step_rows(batch_rows) > batch_rows:
            raise ConfigError(
                f"calibration --microbatches entry {size}: {size.step_rows(batch_rows)} rows, but the "
                f"batch has {batch_rows} (per replica); give at most {batch_rows // size.num_microbatches} "
                f"rows per micro-batch at {size.num_microbatches}, or a larger --batch-size"
            )
    rows = [size.microbatch_rows(batch_rows) for size in sizes]
    if len(set(rows)) != len(rows):
        raise ConfigError(f"calibration --microbatches {named}: {rows} rows per micro-batch; give each "
                          "number of rows once (two sizes of the same rows measure the same actions)")


def build_graph_walk(config: TrainConfig, split: str | None) -> None:
    """Build the split backward's C++ graph walk (`pipefold.runtime.native`) before the ranks
    start, where this run splits a backward: its split block (`split`) or its own schedule."""
    if split is not None:
        native.build()
    else:
        native.build_for(config.schedule.built)


def check_split(config: TrainConfig, split: str | None) -> None:
    """Refuse a split phase `calibration_worker` cannot run, before any rank starts: `split` must
    name a family that splits the backward into I and W on the pipeline's own stages (one per rank)."""
    if split is None:
        return
    if not _splits_backward(_phase_schedule(config, "split", split)):
        raise ConfigError(f"calibration split phase {split!r} runs no split backward; name a family that "
                          f"does ({SPLIT_FAMILY}), or none")


def check_curve(config: TrainConfig, curve: str | None) -> None:
    """Refuse a curve phase `calibration_worker` cannot run, before any rank starts: `curve` must
    name a flush family of one stage per rank (only its F is compared with the pipeline's own)."""
    if curve is not None:
        _phase_schedule(config, "curve", curve)


def check_held(config: TrainConfig, held: str | None) -> None:
    """Refuse a held phase `calibration_worker` cannot run, before any rank starts: `held` must
    name a flush family of one stage per rank that runs no split backward (its F and B are
    compared with the pipeline's own)."""
    if held is None:
        return
    if _splits_backward(_phase_schedule(config, "held", held)):
        raise ConfigError(f"calibration held phase {held!r} splits its backward; name a family that runs "
                          f"whole backwards ({HELD_FAMILY}), or none")


def _phase_schedule(config: TrainConfig, phase: str, family: str) -> Schedule:
    """The schedule of a calibration phase (`phase`: "split", "held" or "curve") of `family` (a
    family's name, or `FAMILY+split`: `build_named`) on the pipeline's own stages, which must be
    one per rank (the phase swaps schedules in place)."""
    virtual = config.schedule.virtual
    if virtual not in (0, 1):
        raise ConfigError(f"calibration {phase} phase {family!r}: the pipeline runs {virtual} stages per "
                          "rank; measure it on one stage per rank (train's default)")
    return build_named(family, num_ranks=config.schedule.ranks,
                       num_microbatches=config.schedule.num_microbatches, num_virtual=1)


def _splits_backward(schedule: Schedule) -> bool:
    return any(action.op is Op.I for row in schedule.actions for action in row)


def calibration_worker(
    config: TrainConfig, sizes: Sequence[CalibrationSize], steps: int, out: str, split: str | None = None,
    held: str | None = None, curve: str | None = None,
) -> None:
    """Entry point of one spawned rank (every rank calls it)."""
    try:
        _calibrate(set_up(config), sizes, steps, Path(out), split, held, curve)
    finally:
        gc.collect()  # as train_worker: the pipeline's cycles hold the rendezvous store
        if dist.is_initialized():
            dist.destroy_process_group()


def _step(job: Job, batches: list[tuple[Tensor, Tensor]]) -> None:
    """One step as `pipefold train`'s loop runs it (no streaming, no adaptive choice), on batches
    drawn before its clock starts, as the loop draws them."""
    pipe, optimizer, scheduler = job.pipe, job.optimizer, job.scheduler
    scaler = pipe.loss_scale
    skipped_before = 0 if scaler is None else scaler.num_skipped
    accumulated_step(pipe, batches)
    if optimizer is not None and scheduler is not None:
        skipped = scaler is not None and scaler.num_skipped > skipped_before  # fp16 overflow
        apply_update(pipe, optimizer, scheduler, job.config.clip_norm, skipped=skipped)


@dataclass
class _Phase:
    """One schedule the run measures, and what its kept steps recorded."""

    schedule: Schedule
    size: CalibrationSize
    batch_rows: int
    """Rows of each batch the job draws (per replica); a sliced size runs its first rows."""
    kept: list[tuple[float, float, Timeline]] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    def batches(self, job: Job) -> list[tuple[Tensor, Tensor]]:
        """One step's batches, drawn as train's loop draws them; a sliced size keeps their first rows."""
        drawn = [job.next_batch() for _ in range(job.config.grad_accumulation)]
        rows = self.size.step_rows(self.batch_rows)
        if rows == self.batch_rows:
            return drawn
        return [(inputs[:rows], targets[:rows]) for inputs, targets in drawn]

    def to_json(self) -> dict[str, Any]:
        if not self.kept:
            raise ConfigError(f"calibration: no step of {self.schedule.name} at {self.size} "
                              "micro-batches was kept; give more steps")
        timelines = [t for _, _, t in self.kept]
        costs = measured_cost_model(timelines, self.schedule, step_times=[wall for wall, _, _ in self.kept])
        # The stages whose I and W ran apart (the runtime fuses a pair nothing separates on a
        # stage no other rank waits for: the first).
        split = sorted({action.stage for row in self.schedule.actions for action in row if action.op is Op.I})
        return {"num_microbatches": self.size.num_microbatches,
                "microbatch_rows": self.size.microbatch_rows(self.batch_rows),
                "step_rows": self.size.step_rows(self.batch_rows), "schedule": self.schedule.name,
                "costs": costs.to_json(), "split_stages": split,
                # A rank's gaps after an action whose output went to another rank, and after the
                # others: what a send costs its sender (`pipefold.plan.send_fit`).
                "send_gaps": measured_send_gaps(timelines, self.schedule),
                "kept_step_seconds": [wall for wall, _, _ in self.kept],
                "kept_step_cpu_seconds": [cpu for _, cpu, _ in self.kept],
                "step_seconds": self.walls, "step_cpu_seconds": self.cpus}


def _calibrate(job: Job, sizes: Sequence[CalibrationSize], steps: int, out: Path, split: str | None,
               held: str | None = None, curve: str | None = None) -> None:
    pipe = job.pipe
    family = job.config.schedule.name
    num_ranks = pipe.schedule.num_ranks
    num_virtual = pipe.schedule.num_stages // num_ranks
    batch_rows = job.config.batch_size // job.config.schedule.data_parallel  # `Job.next_batch`'s
    # The pipeline is built for the most micro-batches (`check_sizes`); the first size, the
    # reference, need not be that one, and is switched to before the first step where it is not.

    def phase_of(phase_family: str, size: CalibrationSize) -> _Phase:
        """A block of `phase_family` on the pipeline's stages at `size`."""
        return _Phase(build_named(phase_family, num_ranks=num_ranks, num_microbatches=size.num_microbatches,
                                  num_virtual=num_virtual), size, batch_rows)

    built_for = pipe.schedule.num_microbatches
    phases = [_Phase(pipe.schedule, size, batch_rows) if size.num_microbatches == built_for
              else phase_of(family, size) for size in sizes]
    steps_per_block = blocks(steps, len(sizes))
    # The split phase runs at the first count, right after that count's 1F1B block in each
    # round, so a change of the host's load meets both alike.
    order: list[tuple[_Phase, list[int]]] = [(phase, steps_per_block) for phase in phases]
    split_phase = None
    if split is not None:
        split_phase = phase_of(split, sizes[0])  # on the same stages at the first (reference) size
        order.insert(1, (split_phase, split_blocks(steps_per_block)))
    held_phase = curve_phase = None
    # On a CPU host only: there a rank's actions slow with the memory it holds, and on a GPU GPipe
    # could exceed the memory the pipeline's own 1F1B fits in.
    curve_rows_phase = None
    if curve is not None and job.device.type == "cpu":
        curve_phase = phase_of(curve, sizes[0])
        order.insert(1, (curve_phase, split_blocks(steps_per_block)))
        second = curve_rows_size(sizes, batch_rows, num_ranks)
        if second is not None:
            # Right after that size's 1F1B block, whose F and B on the first rank give its drift.
            curve_rows_phase = phase_of(curve, second)
            at = next(index for index, (phase, _) in enumerate(order) if phase is phases[1])
            order.insert(at + 1, (curve_rows_phase, split_blocks(steps_per_block)))
    if held is not None and job.device.type == "cpu":
        # Right after the first count's 1F1B block too (before the curve's and split's), so the
        # host's load meets them alike: each block's F over 1F1B's is what the curve is fitted on.
        held_phase = phase_of(held, sizes[0])
        order.insert(1, (held_phase, split_blocks(steps_per_block)))
    for round_index in range(len(steps_per_block)):
        for index, (phase, phase_blocks) in enumerate(order):
            if round_index or index or phase.schedule is not pipe.schedule:
                pipe.use_schedule(phase.schedule)
            phase.schedule = pipe.running_schedule
            # The first step of a block runs a freshly switched order; the very first allocates too.
            skip = WARMUP_STEPS if round_index == 0 and index == 0 else 1
            for step in range(phase_blocks[round_index]):
                batches = phase.batches(job)
                started, cpu_started = time.perf_counter(), time.process_time()
                _step(job, batches)
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                phase.walls.append(wall)
                phase.cpus.append(cpu)
                timeline = pipe.last_timeline if job.rank == 0 else None
                if step >= skip and timeline is not None:
                    phase.kept.append((wall, cpu, timeline))
    if job.rank == 0:
        result: dict[str, Any] = {"partition": str(pipe.partition), "batch_size": job.config.batch_size,
                                  "phases": [phase.to_json() for phase in phases]}
        if split_phase is not None:
            result["split_phase"] = split_phase.to_json()
        if held_phase is not None:
            result["held_phase"] = held_phase.to_json()
        if curve_phase is not None:
            result["curve_phase"] = curve_phase.to_json()
        if curve_rows_phase is not None:
            result["curve_rows_phase"] = curve_rows_phase.to_json()
        write_atomic(out, json.dumps(result, indent=1) + "\n")
    dist.barrier()  # peers wait for rank 0's file (as train's report)


def curve_rows_size(sizes: Sequence[CalibrationSize], batch_rows: int, num_ranks: int
                    ) -> CalibrationSize | None:
    """The size of the second curve block: the run's second size where it has twice the first's
    rows per micro-batch and at least 4 micro-batches and the ranks' (zb-h1's later stages then
    defer 3 of every 4 W or more); None: none runs. Its W against the split block's, scaled by
    the stage's B between the two sizes, fits how far a deferred W's extra grows with its rows
    (`pipefold.plan.deferred_weight.fit_deferred_most`); twice the rows, because W's share of B
    held within 1% from 4 to 8 rows in one process but rose 4-8% by 16."""
    if len(sizes) < 2:
        return None
    first, second = sizes[0], sizes[1]
    if second.microbatch_rows(batch_rows) != 2 * first.microbatch_rows(batch_rows):
        return None
    return second if second.num_microbatches >= max(4, num_ranks) else None


def split_blocks(sizes: Sequence[int]) -> list[int]:
    """Steps per round of the split phase: half of each round's block of a size, at least 2 (its
    first, just switched to, is left out), so the phase adds about half of one size's steps."""
    return [max(2, (size + 1) // 2) for size in sizes]


def blocks(steps: int, num_sizes: int) -> list[int]:
    """Steps per block of each size, one block per round: `steps` per size cut into up to
    `MAX_ROUNDS` rounds of at least 4 steps, so a change of the host's load between rounds
    meets every size alike (each block's first step, after a switch, is left out)."""
    rounds = max(1, min(MAX_ROUNDS, steps // 4)) if num_sizes > 1 else 1
    return [steps // rounds + (1 if index < steps % rounds else 0) for index in range(rounds)]
