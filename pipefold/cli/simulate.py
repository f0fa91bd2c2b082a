"""`pipefold simulate`: predict a schedule's timeline, bubble and memory from costs."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from pipefold.errors import ConfigError, ScheduleError
from pipefold.files import write_atomic
from pipefold.schedule import build, stream
from pipefold.simulate import CostModel, simulate, step_end_time
from pipefold.viz import render_ascii, render_png, to_chrome_trace


def _costs_triple(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(
            f"--costs wants three non-negative numbers F,I,W (e.g. 1,1,1); got {text!r}"
        )
    return values[0], values[1], values[2]


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared with `pipefold train`: --schedule, --ranks, --microbatches, --virtual."""
    parser.add_argument("--schedule", default="1f1b", help="schedule family (see `pipefold schedules`)")
    parser.add_argument("--ranks", type=int, default=4, help="pipeline ranks p")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches m per step")
    parser.add_argument("--virtual", type=int, default=None,
                        help="stages per rank v (default: the family's own)")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="predict a schedule's timeline, bubble and memory",
        description="Simulate one or more steps of a schedule with a cost model and print "
        "an ASCII timeline and metrics. Costs are per stage (virtual stages included).",
    )
    add_schedule_arguments(parser)
    costs = parser.add_mutually_exclusive_group()
    costs.add_argument("--costs", type=_costs_triple, default=(1.0, 1.0, 1.0), metavar="F,I,W",
                       help="uniform per-stage times of forward, input-gradient and weight-gradient "
                       "backward; a full backward B costs I+W (default 1,1,1)")
    costs.add_argument("--costs-file", metavar="FILE", help="a CostModel JSON file")
    parser.add_argument("--cores", type=int, default=None, metavar="N",
                        help="the ranks share N cores (CPU processes on one host, cores / threads per "
                        "rank): ranks computing at once split them fairly; default: a device per rank")
    parser.add_argument("--steps", type=int, default=1, help="steps to simulate back to back")
    parser.add_argument("--no-sync", action="store_true",
                        help="no global barrier between steps (shows asynchronous steady state)")
    parser.add_argument("--stream", action="store_true",
                        help="pipedream / pipedream-2bw: the --steps steps as one streaming run "
                        "(Pipeline.train): filled and drained once, steps overlapping")
    parser.add_argument("--png", metavar="FILE", help="write the timeline as a PNG")
    parser.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the chart")
    parser.add_argument("--width", type=int, default=100, help="ASCII chart width in characters")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1; got {args.steps}")
    schedule = build(args.schedule, num_ranks=args.ranks, num_microbatches=args.microbatches,
                     num_virtual=args.virtual)
    if args.costs_file:
        costs = CostModel.from_json(args.costs_file)
    else:
        f, i, w = args.costs
        costs = CostModel.uniform(schedule.num_stages, f=f, i=i, w=w)
    if args.cores is not None:
        costs = dataclasses.replace(costs, num_cores=args.cores)
    if args.stream:
        try:
            plan = stream(args.schedule, num_ranks=args.ranks, num_microbatches=args.microbatches)
        except ScheduleError as error:
            raise ConfigError(f"--stream: {error}") from None
        timeline = simulate(plan.unroll(args.steps), costs)
    else:
        timeline = simulate(schedule, costs, num_steps=args.steps, sync=not args.no_sync)
    if args.png:
        write_atomic(args.png, render_png(timeline))
    if args.trace:
        write_atomic(args.trace, json.dumps(to_chrome_trace(timeline)))
    summary = timeline.summary()
    # After the last step's flush: the tied weights' gradient sum (earlier steps' are in the makespan).
    tied_s = step_end_time(schedule, costs) if not args.stream else 0.0
    if args.json:
        summary.update(
            tied_exchange_s=tied_s,
            schedule=schedule.name, num_ranks=schedule.num_ranks, num_stages=schedule.num_stages,
            num_microbatches=schedule.num_microbatches, num_virtual=schedule.num_virtual,
            num_steps=args.steps,
        )
        print(json.dumps(summary))
        return 0

    console = Console()
    console.print(render_ascii(timeline, width=args.width), highlight=False, markup=False, soft_wrap=True)
    table = Table(title=f"{schedule.name}: p={schedule.num_ranks} m={schedule.num_microbatches} "
                  f"v={schedule.num_virtual}")
    table.add_column("rank")
    table.add_column("busy")
    table.add_column("peak activations (micro-batches)")
    for rank in range(schedule.num_ranks):
        table.add_row(str(rank), f"{timeline.busy_time(rank):.4g}", str(timeline.peak_activations(rank)))
    console.print(table)
    console.print(f"makespan {timeline.makespan:.4g}   bubble fraction {timeline.bubble_fraction:.4f}")
    if tied_s:
        step = timeline.makespan + tied_s
        console.print(f"tied-gradient exchange after the flush {tied_s:.4g}: step {step:.4g}")
    for path, what in ((args.png, "PNG"), (args.trace, "trace")):
        if path:
            console.print(f"wrote {what} {path}")
    return 0
