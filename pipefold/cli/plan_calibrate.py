"""`pipefold plan --profile`'s calibration: a short `pipefold train` run prices the profile as the ranks run.

    pipefold plan --profile --ranks 2                        # profile, then train's default at 3 sizes
    pipefold plan --profile --ranks 2 --calibrate-steps 0    # the one-process profile's prices alone

A profile times each layer in one process; on a CPU host the same layers inside a run of
`pipefold train` (several processes, each pinned to one thread, sharing caches and memory
bandwidth) take another time, and that ratio moved by a quarter between two profiles on the
same quiet host, and how a layer's time grows with its rows differs as much. So after profiling,
`plan` trains `pipefold train`'s default pipeline (1F1B, its default partition, the planned
ranks, fp32 as profiled) on the same model and batch for `--calibrate-steps` steps at each of
up to five micro-batch sizes (the profile's count, its half and its quarter, then fewer rows
down to the fewest the search prices: `calibration_microbatches`; a size of fewer rows runs at
most `SMALL_MICROBATCHES_PER_REFERENCE` x the reference's micro-batches, on a slice of the batch,
so the run's cost does not grow with the batch: `calibration_sizes`), in one launch of the ranks
built for the most of them (`pipefold.cli.calibration_run`, `pipefold.job.calibration`), fits each stage's
F and B over rows (a fixed part and a part per row), prices the profile's layers on those lines
and, at each measured size, keeps the measured time over the line's, so a size between two
measured ones is priced between them (`pipefold.plan.calibrate.at_run_prices`,
`ModelCosts.row_scales`). The same launch runs 1F1B with each B run as I then W ("1f1b+split":
the same stages, order and activations held) for a few steps at the first count, so the split
backward's I and W are priced as the ranks run them too (`ModelCosts.split_overhead_s`, W's
share per stage). On a CPU host it also runs GPipe and zb-h1 on the same stages for a few steps
each, so an action's slowdown with the activation memory its rank holds is priced, on a curve
through GPipe's ranks (`ModelCosts.held_curve`, `pipefold.plan.held_cost`), and an F's slowdown
with the I states its rank holds (input-gradient backwards waiting for their W), from zb-h1's last
rank (`ModelCosts.held_state_forward`, `pipefold.plan.held_states`), and a W run away from its own
I, from zb-h1's W over the split block's (`ModelCosts.deferred_weight_grad`), with a second zb-h1
block at the second size (twice the rows) for the most seconds that costs
(`ModelCosts.deferred_weight_most_s`); a GPU's kernels do not slow so, and GPipe could exceed the
memory 1F1B fits in. The split's share is pooled with the profile's own estimate of it (its I, W
and B per layer: `pipefold.plan.split_fit.pooled_split_share`). Every candidate,
at any micro-batch size and partition, is then priced at run-time prices; the runtime's
measured time per action and per step outside the actions replace the profile's too, a send's
occupancy of its sender is priced apart from the time per action (the ranks' gaps after an action
whose output went to the other rank, against after the others, at each size: a fixed part and a
part per byte, `pipefold.plan.send_fit`), and without link flags a message costs the run's
measured latency. It costs one launch of the
ranks and the steps (the seconds are said in the costs' `source` and the plan JSON's
`calibration`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipefold.errors import ConfigError, PipefoldError
from pipefold.job.calibration_size import CalibrationSize, format_sizes
from pipefold.job.sections import ScheduleConfig
from pipefold.plan import ModelCosts
from pipefold.plan.calibrate import HeldBlock, RunCalibration, at_run_prices
from pipefold.plan.held_cost import family_deferred_shares, family_state_weights, order_held_bytes
from pipefold.plan.send_fit import SendGaps
from pipefold.simulate import CostModel

__all__ = ["Calibrated", "add_arguments", "calibrate", "calibration_command", "calibration_microbatches",
           "calibration_sizes", "calibration_steps", "run_sizes", "speed_spread"]

DEFAULT_STEPS = 12
"""Steps of the calibration run at each micro-batch size, in 3 rounds over the sizes
(`pipefold.job.calibration.blocks`): the costs are of the steps after each block's first (the
first block's first two: allocation)."""

NUM_SIZES = 3
"""Micro-batch sizes of the profile's rows or more the calibration run measures at most
(`calibration_microbatches`)."""

NUM_SMALLER = 2
"""Micro-batch sizes of fewer rows than the profile's the calibration run measures at most: the
fewest rows the search prices and one between (`calibration_microbatches`)."""

SMALL_MICROBATCHES_PER_REFERENCE = 4
"""A size of fewer rows than the profile's runs at most this many times the reference's
micro-batches, or of the ranks if more (`calibration_sizes`). The fit uses per-action costs
(`measured_cost_model`: each stage's typical F and B), which need the schedule's steady state,
not the whole batch: 1F1B on p ranks holds min(m, p) micro-batches' activations, so beyond p
more micro-batches add only more of the same actions. 4x gives a small size as many steady
actions per rank as the reference (8) has, and more: 3/4 of its actions run in the steady state
where m = 4p; and it keeps a batch of 32 at train's 8 micro-batches measured as before (16 and
32 micro-batches, 2 and 1 row), where a batch of 512 would otherwise run 512 one-row
micro-batches a step in a pipeline built for 512."""

BUSY_SHARE = 0.8
"""Below this share of a core per CPU rank, the calibration says the host was busy."""

UNSTEADY_SPREAD = 0.15
"""Above this interquartile spread of the run's kept steps, the calibration says so: the same steps
took different times (the host's load or speed moved, or the run had not settled), and a
forecast priced at their median inherits that uncertainty."""

DEFAULT_RANKS = 2
"""Ranks of the calibration run where `--ranks` is not given (pp searched with `--devices`)."""


@dataclass(frozen=True)
class Calibrated:
    """Costs at the run's prices, how they were scaled, and what the run cost."""

    costs: ModelCosts
    profile_costs: ModelCosts
    """The one-process profile's costs, before the run's prices."""
    calibration: RunCalibration
    seconds: float
    """What the calibration run added to `plan --profile`, wall seconds."""
    ranks: int
    steps: int
    measured_step_s: float
    """The run's median wall step (its last steps)."""
    core_share: float
    """Rank 0's CPU seconds over its wall seconds per step (median): below 1, other work shared its core."""
    step_seconds: tuple[float, ...] = ()
    """Every wall step of the run's first size, in order (its first block's warm-up steps too): how
    the run's speed moved while it measured."""
    step_spread: float = 0.0
    """The kept steps' interquartile range over their median (`speed_spread`)."""
    sizes: tuple[CalibrationSize, ...] = ()
    """The sizes the run measured, in order (`calibration_sizes`): a sliced one ran part of the batch."""

    def describe(self) -> str:
        """One line: the run, the scales per stage, its cost in seconds."""
        cal = self.calibration

        def scales(values: tuple[float, ...]) -> str:
            return "/".join(f"{value:.2f}" for value in values)

        def ms(values: tuple[float, ...]) -> str:
            return "/".join(f"{value * 1e3:.2f}" for value in values)

        sizes = "/".join(map(str, cal.measured_rows or (cal.rows,)))
        if self.sizes:
            sizes += f" ({format_sizes(self.sizes)} micro-batches)"
        split = (f"; split backward ({cal.split_schedule or 'zb-h1'} at {cal.rows} rows): W "
                 f"{scales(cal.weight_share)} of the "
                 f"backward's work per stage, I and W each {cal.split_backward_share:.1%} of their stage's "
                 f"backward work + {cal.split_overhead_s * 1e6:.0f} us beyond B"
                 + (f" (the block {cal.split_share_block:.1%}, the profile {cal.split_share_profile:.1%})"
                    if cal.split_share_profile is not None else "")
                 if cal.weight_share else "")
        knots = ", ".join(f"x{f:.3f} F, x{b:.3f} B at +{x / 2**20:.1f}" for x, f, b in cal.held_curve)
        # The split block's bytes where they differ from 1F1B's (a zb-h1 split block before the curve
        # block).
        split_bytes = () if cal.held_split_bytes == cal.held_bytes else cal.held_split_bytes
        split_held = "".join(f", {name} {_mib(values)}" for name, values in (
            ("zb-h1", cal.held_curve_block_bytes), (cal.split_schedule or "zb-h1", split_bytes)) if values)
        held = (f"; activations held (gpipe at {cal.rows} rows, {_mib(cal.held_block_bytes)} MiB per rank"
                f"{split_held} against 1f1b's {_mib(cal.held_bytes)}): {knots} MiB beyond a layer's own "
                "rank's"
                + (f"; an F x{1 + cal.held_state_forward:.3f} with one I state held (zb-h1)"
                   if cal.held_state_forward else "")
                + (f"; a W x{1 + cal.deferred_weight_grad:.3f} away from its own I (zb-h1)"
                   if cal.deferred_weight_grad else "")
                + (f", at most {cal.deferred_weight_most_s * 1e3:.2f} ms more (zb-h1 at "
                   f"{2 * cal.rows} rows)" if cal.deferred_weight_most_s else "")
                if cal.held_bytes else "")
        lines = (f"; per stage F {ms(cal.fixed_s)} ms + {ms(cal.forward_s_per_row)} ms per row, B the same "
                 f"fixed + {ms(cal.backward_s_per_row)} ms per row (largest miss {cal.fit_error:.0%}; priced "
                 f"through each size at measured / line F {scales(tuple(e[1] for e in cal.row_scales))}, B "
                 f"{scales(tuple(e[2] for e in cal.row_scales))} at "
                 f"{'/'.join(str(e[0]) for e in cal.row_scales)} rows)"
                 if cal.fixed_s else "")
        measured_sends = ", ".join(f"{gap * 1e6:.0f} us at {size / 2**10:.0f} KiB"
                                   for size, gap, _ in cal.send_points)
        sends = (f" and a send {cal.send_overhead_s * 1e6:.0f} us + "
                 f"{cal.send_s_per_byte * 2**20 * 1e6:.0f} us per MiB (its gaps after a send less the "
                 f"others': {measured_sends}; {cal.mean_gap_s * 1e6:.0f} us per action over all)"
                 if cal.mean_gap_s else "")
        return (f"calibrated on a {self.ranks}-rank run of pipefold train's default ({self.steps} steps at "
                f"each of {sizes} rows per micro-batch, partition {list(cal.bounds)}, median step "
                f"{self.measured_step_s * 1e3:.0f} ms at {cal.rows} rows; {self.seconds:.1f} s): the "
                f"profile's F x {scales(cal.forward_scale)}, B x {scales(cal.backward_scale)} per stage at "
                f"{cal.rows} rows{lines}{split}{held}, runtime {cal.action_overhead_s * 1e6:.0f} us per "
                f"action{sends}, {cal.message_latency_s * 1e6:.0f} us per message, "
                f"{cal.step_overhead_s * 1e3:.1f} ms per step outside the actions; rank 0 had "
                f"{self.core_share:.0%} of a core, its steps an interquartile spread of "
                f"{self.step_spread:.0%}")

    def to_json(self) -> dict[str, Any]:
        cal = self.calibration
        return {"seconds": self.seconds, "ranks": self.ranks, "steps": self.steps, "rows": cal.rows,
                "bounds": list(cal.bounds), "forward_scale": list(cal.forward_scale),
                "backward_scale": list(cal.backward_scale), "action_overhead_s": cal.action_overhead_s,
                "step_overhead_s": cal.step_overhead_s, "message_latency_s": cal.message_latency_s,
                "measured_step_s": self.measured_step_s, "measured_rows": list(cal.measured_rows),
                "fixed_s": list(cal.fixed_s), "forward_s_per_row": list(cal.forward_s_per_row),
                "backward_s_per_row": list(cal.backward_s_per_row), "fit_error": cal.fit_error,
                "tied_exchange_s": cal.tied_exchange_s, "split_overhead_s": cal.split_overhead_s,
                "split_backward_share": cal.split_backward_share,
                "split_share_block": cal.split_share_block, "split_share_profile": cal.split_share_profile,
                "weight_share": list(cal.weight_share),
                "split_action_overhead_s": cal.split_action_overhead_s,
                "held_bytes": list(cal.held_bytes), "held_block_bytes": list(cal.held_block_bytes),
                "held_split_bytes": list(cal.held_split_bytes),
                "held_curve": [list(knot) for knot in cal.held_curve], "split_drift": cal.split_drift,
                "held_curve_block_bytes": list(cal.held_curve_block_bytes), "curve_drift": cal.curve_drift,
                "held_state_forward": cal.held_state_forward,
                "deferred_weight_grad": cal.deferred_weight_grad,
                "deferred_weight_most_s": cal.deferred_weight_most_s,
                "split_schedule": cal.split_schedule,
                "row_scales": [list(entry) for entry in cal.row_scales],
                "send_overhead_s": cal.send_overhead_s, "send_s_per_byte": cal.send_s_per_byte,
                "mean_gap_s": cal.mean_gap_s, "send_points": [list(point) for point in cal.send_points],
                "core_share": self.core_share, "step_seconds": list(self.step_seconds),
                "step_spread": self.step_spread, "sizes": [str(size) for size in self.sizes],
                "profile_costs": self.profile_costs.to_json()}


def _mib(values: tuple[int, ...]) -> str:
    return "/".join(f"{value / 2**20:.1f}" for value in values)


def speed_spread(step_seconds: tuple[float, ...] | list[float]) -> float:
    """The steps' interquartile range over their median: how far the host's speed moved while a
    run measured (0 for fewer than 4 steps). Quartiles, not the extremes: one slow step (a
    collection, a page fault) does not make a steady run look unsteady."""
    if len(step_seconds) < 4:
        return 0.0
    first, _, third = statistics.quantiles(step_seconds, n=4)
    median = statistics.median(step_seconds)
    return (third - first) / median if median > 0 else 0.0


def add_arguments(parser: Any) -> None:
    """The flag of the calibration run."""
    parser.add_argument("--calibrate-steps", type=int, metavar="N",
                        help=f"with --profile / --measure: after profiling, train pipefold train's default "
                        "pipeline on the planned ranks for N steps at each of up to "
                        f"{NUM_SIZES + NUM_SMALLER} micro-batch sizes (one launch; one of few rows on a "
                        "slice of the batch) "
                        "and price every candidate on the stage costs over rows that run "
                        f"measured (default {DEFAULT_STEPS} for the built-in GPT, 0 for a "
                        "Hugging Face model, whose training needs its tokenizer or data; 0: the one-process "
                        "profile's prices alone)")


def calibration_steps(args: argparse.Namespace) -> int:
    """The calibration run's steps (0: none); refuses the flag where nothing is measured."""
    steps = args.calibrate_steps
    measuring = bool(args.profile or args.measure)
    if steps is not None and not measuring:
        raise ConfigError("--calibrate-steps calibrates measured costs; add --profile (or --model ... "
                          "--measure), or drop --calibrate-steps")
    if steps is None:
        # A Hugging Face model trains on its tokenizer's or the given data, which a model folder
        # may lack: calibrated only when asked.
        hf = args.model not in (None, "gpt")
        return DEFAULT_STEPS if measuring and not hf else 0
    if isinstance(steps, bool) or steps < 0 or 0 < steps < 3:
        raise ConfigError(f"--calibrate-steps = {steps}; give 3 or more steps (the first is a warm-up), or 0 "
                          "for none")
    return int(steps)


def _bounds(partition: str) -> tuple[int, ...]:
    """Stage bounds from summary.json's partition text ("[0:4 | 4:8]")."""
    stages = [part.split(":") for part in partition.strip("[]").split("|")]
    return tuple(int(start) for start, _ in stages) + (int(stages[-1][1]),)


def calibration_microbatches(
    microbatches: int, batch_size: int, most_microbatches: int | None = None
) -> tuple[int, ...]:
    """The micro-batch counts the calibration run measures: the profile's first (the reference),
    then halved while the rows per micro-batch change (up to `NUM_SIZES` sizes, larger rows), then
    up to `NUM_SMALLER` counts of fewer rows than the profile's, down to the fewest rows the
    search prices (`most_microbatches`, the most it searches; None: the batch): the fit then
    prices the small micro-batches between measured sizes instead of extrapolating a line below
    them, which undershot a one-row micro-batch by ~20%. A batch of 32 at 8 micro-batches: 8, 4,
    2 (4, 8, 16 rows), then 16 and 32 (2 and 1 row). The run caps the counts of fewer rows
    (`calibration_sizes`)."""
    for name, value in (("microbatches", microbatches), ("batch_size", batch_size),
                        ("most_microbatches", most_microbatches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"calibration {name} = {value!r}; give an integer of 1 or more")
    if microbatches > batch_size:
        raise ConfigError(f"calibration microbatches = {microbatches} exceeds batch_size = {batch_size}; "
                          "give at most one micro-batch per sample")

    def rows(count: int) -> int:
        return math.ceil(batch_size / count)

    counts = [microbatches]
    while len(counts) < NUM_SIZES and counts[-1] > 1:
        count = counts[-1] // 2
        if rows(count) != rows(counts[-1]):
            counts.append(count)
        else:
            break
    most = min(batch_size, batch_size if most_microbatches is None else most_microbatches)
    # The fewest rows the search prices, at the fewest micro-batches that give them.
    fewest = min((count for count in range(microbatches, most + 1) if rows(count) == rows(most)),
                 default=None)
    if fewest is None or rows(fewest) >= rows(microbatches):
        return tuple(counts)
    # Halfway between the reference and the fewest rows, a power of 2 times the reference (a divisor
    # of a batch the reference divides, as far as it can be), where its rows differ from both.
    middle = microbatches * 2 ** round(math.log2(fewest / microbatches) / 2)
    smaller = [middle] if rows(fewest) < rows(middle) < rows(microbatches) else []
    return (*counts, *smaller[:NUM_SMALLER - 1], fewest)


def calibration_sizes(
    microbatches: int, batch_size: int, most_microbatches: int | None = None, num_ranks: int = 1
) -> tuple[CalibrationSize, ...]:
    """`calibration_microbatches`' counts as the run measures them: a count of fewer rows than the
    reference (`microbatches`) above `SMALL_MICROBATCHES_PER_REFERENCE` x the reference or
    `num_ranks`, whichever is more (the cap), runs the cap's micro-batches of its rows, on the
    batch's first rows; every other count, on the whole batch as train runs it. A batch of 32 at
    8 micro-batches on 2 ranks: 8, 4, 2, 16, 32 (none capped); of 512: 8, 4, 2, 32x8, 32x1
    (64 and 512 micro-batches of 8 and 1 row capped to 32), in a pipeline built for 32."""
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ConfigError(f"calibration num_ranks = {num_ranks!r}; give an integer of 1 or more")
    counts = calibration_microbatches(microbatches, batch_size, most_microbatches)
    cap = SMALL_MICROBATCHES_PER_REFERENCE * max(microbatches, num_ranks)

    def size(count: int) -> CalibrationSize:
        if count <= cap:
            return CalibrationSize(count)
        rows = math.ceil(batch_size / count)
        # The cap's micro-batches of these rows may exceed the batch where `count` is not the
        # fewest micro-batches of its rows (the one between, a power of 2 x the reference): then
        # as many as the batch holds.
        return CalibrationSize(min(cap, batch_size // rows), rows)

    return tuple(size(count) for count in counts)


def run_sizes(args: argparse.Namespace, ranks: int) -> tuple[CalibrationSize, ...]:
    """`calibration_sizes` for `plan`'s flags and a run on `ranks`: the profile's count (pinned,
    else train's default capped at the batch) first, down to the fewest rows the search prices (a
    pinned count: that one; else the batch, or `--max-microbatches`, micro-batches)."""
    pinned = args.microbatches
    reference = pinned or min(ScheduleConfig.num_microbatches, args.batch_size)
    return calibration_sizes(reference, args.batch_size, pinned or getattr(args, "max_microbatches", None),
                             ranks)


def _train_words(args: argparse.Namespace, ranks: int, out: Path, hf: bool) -> list[str]:
    # The pipeline is built for the most micro-batches the run measures: a running pipeline
    # switches only to as many or fewer (`pipefold.job.calibration.check_sizes`).
    microbatches = max(size.num_microbatches for size in run_sizes(args, ranks))
    words = ["--ranks", str(ranks), "--batch-size", str(args.batch_size), "--microbatches", str(microbatches),
             "--out", str(out), "--device", args.device,
             "--precision", getattr(args, "precision", None) or "fp32",
             "--set", "sample_tokens=0", "--set", "eval_every=0"]
    if hf:
        return [*words, "--model", args.model, "--seq-len", str(args.seq_len)]
    return [*words, "--num-layers", str(args.num_layers), "--d-model", str(args.d_model),
            "--num-heads", str(args.num_heads), "--seq-len", str(args.seq_len)]


def calibration_command(
    args: argparse.Namespace, ranks: int, steps: int, folder: Path, hf: bool
) -> list[str]:
    """The calibration run's command line (`pipefold.cli.calibration_run`): its result goes to
    `folder`/calibration.json, its run folder is `folder`/run. `benchmarks/host_speed.py` runs
    the same command beside `pipefold train`."""
    from pipefold.job.calibration import CURVE_FAMILY, HELD_FAMILY, SPLIT_FAMILY

    return [sys.executable, "-m", "pipefold.cli.calibration_run",
            "--result", str(folder / "calibration.json"),
            "--microbatches", format_sizes(run_sizes(args, ranks)), "--phase-steps", str(steps),
            "--split", SPLIT_FAMILY, "--held", HELD_FAMILY, "--curve", CURVE_FAMILY, "--",
            *_train_words(args, ranks, folder / "run", hf)]


def _held_block(costs: ModelCosts, measured: dict[str, Any], bounds: tuple[int, ...], rows: int, ranks: int
                ) -> HeldBlock | None:
    """The run's held phase (GPipe on its stages) and curve phase (zb-h1) with the activation
    bytes each block held per rank in the planner's memory model (`order_held_bytes`); None where
    the run had no held phase."""
    phase = measured.get("held_phase")
    if phase is None:
        return None
    first = measured["phases"][0]
    count = int(first["num_microbatches"])
    split = measured.get("split_phase")
    curve = measured.get("curve_phase")

    def held_by(block: dict[str, Any]) -> tuple[int, ...]:
        return order_held_bytes(costs, bounds, rows, str(block["schedule"]), ranks,
                                int(block["num_microbatches"]))

    # The curve block (zb-h1) holds a little more than 1F1B on its later ranks: the curve's points
    # at small excesses, and its other ranks the host's drift between the blocks. The split block
    # ("1f1b+split") holds what 1F1B holds; a zb-h1 split block (a run before the curve block)
    # served as the curve block too.
    second = measured.get("curve_rows_phase")
    second_fields: dict[str, Any] = {}
    if second is not None and curve is not None:
        at = int(second["microbatch_rows"])
        count = int(second["num_microbatches"])
        run_at = next(block for block in measured["phases"] if int(block["microbatch_rows"]) == at)
        second_fields = {"curve_rows": CostModel.from_json(second["costs"]), "curve_rows_at": at,
                         "run_rows_bytes": order_held_bytes(costs, bounds, at, str(run_at["schedule"]), ranks,
                                                            int(run_at["num_microbatches"])),
                         "curve_rows_bytes": order_held_bytes(costs, bounds, at, str(second["schedule"]),
                                                              ranks, count),
                         "curve_rows_deferred_shares": family_deferred_shares(str(second["schedule"]), ranks,
                                                                              count, 1)}
    return HeldBlock(CostModel.from_json(phase["costs"]),
                     order_held_bytes(costs, bounds, rows, str(first["schedule"]), ranks, count),
                     held_by(phase), () if split is None else held_by(split),
                     None if curve is None else CostModel.from_json(curve["costs"]),
                     () if curve is None else held_by(curve),
                     () if curve is None else family_state_weights(str(curve["schedule"]), ranks,
                                                                   int(curve["num_microbatches"]), 1),
                     () if curve is None else family_deferred_shares(str(curve["schedule"]), ranks,
                                                                     int(curve["num_microbatches"]), 1),
                     **second_fields)


def calibrate(
    args: argparse.Namespace, costs: ModelCosts, steps: int, hf: bool, ranks: int | None,
    layer_split: Sequence[tuple[float, float, float]] | None = None,
) -> Calibrated:
    """Train `pipefold train`'s default pipeline for `steps` at each of its micro-batch sizes
    (`calibration_sizes`) in one launch of `ranks` (None: `DEFAULT_RANKS`), then `costs` at the
    prices that run measured. `layer_split`: the profile's (I, W, B) seconds per layer, whose
    estimate of the split's share is pooled with the split block's (`at_run_prices`)."""
    ranks = DEFAULT_RANKS if ranks is None else ranks
    sizes = run_sizes(args, ranks)
    named = ", ".join(map(str, sizes))
    from pipefold.job.calibration import CURVE_FAMILY, HELD_FAMILY, SPLIT_FAMILY, curve_rows_size

    second = curve_rows_size(sizes, args.batch_size, ranks)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pipefold-calibrate-") as folder:
        result_file = Path(folder) / "calibration.json"
        words = calibration_command(args, ranks, steps, Path(folder), hf)
        print(f"calibrating: {ranks} ranks of pipefold train's default pipeline, {steps} steps at each of "
              f"{named} micro-batches (NxR: N of R rows, a slice of the batch), and {SPLIT_FAMILY} at "
              f"{sizes[0]} for its split backward"
              + (f", {HELD_FAMILY} and {CURVE_FAMILY} for the activations they hold"
                 + (f" ({CURVE_FAMILY} at {second} too, for a deferred W at twice the rows)"
                    if second else "")
                 if args.device != "cuda" else ""),
              file=sys.stderr)
        done = subprocess.run(words, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not result_file.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise PipefoldError(
                f"the calibration run of pipefold train ({ranks} ranks, {steps} steps at each of "
                f"{named} micro-batches) failed (exit {done.returncode}): {' | '.join(tail)}; fix it, "
                "or plan at the profile's prices with --calibrate-steps 0"
            )
        measured = json.loads(result_file.read_text())
    # Each size's rows per micro-batch as the run cut them (a sliced size's are not the batch's share).
    points = [(CostModel.from_json(phase["costs"]), int(phase["microbatch_rows"]))
              for phase in measured["phases"]]
    (run, rows), others = points[0], points[1:]
    split = measured.get("split_phase")
    bounds = _bounds(measured["partition"])
    held = _held_block(costs, measured, bounds, rows, ranks)
    # Each size's gaps after a send and after the other actions (a run before them: none, the send
    # then not priced apart).
    gaps = [SendGaps.from_json(phase["send_gaps"]) for phase in measured["phases"] if "send_gaps" in phase]
    priced, calibration = at_run_prices(costs, run, bounds, rows, others,
                                        split=None if split is None else CostModel.from_json(split["costs"]),
                                        split_stages=None if split is None else split["split_stages"],
                                        held=held, layer_split=layer_split,
                                        send_gaps=gaps if len(gaps) == len(points) else ())
    if split is not None:
        calibration = replace(calibration, split_schedule=str(split["schedule"]))
    seconds = time.perf_counter() - started
    first = measured["phases"][0]
    walls = first["kept_step_seconds"]
    measured_step = statistics.median(walls)
    share = statistics.median(cpu / wall
                              for cpu, wall in zip(first["kept_step_cpu_seconds"], walls, strict=True)
                              if wall > 0)
    spread = speed_spread(walls)
    result = Calibrated(priced, costs, calibration, seconds, ranks, steps, measured_step, share,
                        tuple(first["step_seconds"]), spread, sizes)
    if share < BUSY_SHARE and args.device != "cuda":
        print(f"note: during the calibration run rank 0 had {share:.0%} of a core (other work on this host): "
              "the plan is priced at that load and holds while it lasts", file=sys.stderr)
    if spread > UNSTEADY_SPREAD:
        print(f"note: the calibration run's steps spread by {spread:.0%} of their median (interquartile; "
              f"{min(walls) * 1e3:.0f}-{max(walls) * 1e3:.0f} ms): the same steps did not take the same "
              "time, and a forecast priced at their median is as uncertain; plan again when the host is "
              "quiet, or pick by measurement with --measure-top K", file=sys.stderr)
    return replace(result, costs=replace(priced, source=f"{costs.source}; {result.describe()}"))
