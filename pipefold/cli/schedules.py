"""`pipefold schedules`: the families with their bubble and memory formulas and legal ranges.

    pipefold schedules                                     # the families, as a table
    pipefold schedules find --ranks 4 --microbatches 8 --costs costs.json --save auto.json

`find` searches a schedule for a cost model (`pipefold.plan.search_schedule`),
prints its grid and how it compares with the fastest hand-written family, and
`--save` writes it as pipefold's schedule JSON for `pipefold.schedule.io.load`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from pipefold.errors import ConfigError
from pipefold.files import write_atomic
from pipefold.plan import search_schedule
from pipefold.schedule import Placement, family, format_grid, names
from pipefold.schedule.io import dumps
from pipefold.simulate import CostModel


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "schedules",
        help="list the schedule families, or search one for given costs",
        description="List every schedule family with its bubble and memory formulas "
        "(p ranks, m micro-batches, v stages per rank) and its legal parameter range. "
        "`pipefold schedules find` searches a schedule for a cost model instead.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per family")
    parser.set_defaults(func=run)
    commands = parser.add_subparsers(dest="schedules_command", metavar="SUBCOMMAND")
    _add_find_parser(commands)


def run(args: argparse.Namespace) -> int:
    entries = [family(name) for name in names()]
    if args.json:
        for entry in entries:
            print(json.dumps({
                "name": entry.name, "summary": entry.summary, "bubble": entry.bubble,
                "memory": entry.memory, "legal": entry.legal, "default_virtual": entry.default_virtual,
            }))
        return 0
    table = Table(title="pipefold schedule families (p ranks, m micro-batches, v stages per rank)")
    for column in ("name", "what", "bubble (uniform costs)", "peak activations", "legal"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        table.add_row(entry.name, entry.summary, entry.bubble, entry.memory, entry.legal)
    Console().print(table)
    return 0


# -- pipefold schedules find --------------------------------------------------------------------


def _add_find_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "find",
        help="search a schedule for a cost model",
        description="Search a flush schedule for the given per-stage costs (a list scheduler with "
        "the zero-bubble paper's priorities, then a bounded local search, scored by the simulator), "
        "print it with its makespan, bubble and peak memory next to the fastest hand-written family, "
        "and optionally save it as a schedule JSON that Pipeline(schedule=io.load(FILE)) runs.",
    )
    parser.add_argument("--ranks", type=int, default=4, help="pipeline ranks p")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches m per step")
    parser.add_argument("--virtual", type=int, default=1, help="stages per rank v (default 1)")
    parser.add_argument("--placement", choices=("contiguous", "v", "looped"), default=None,
                        help="stage layout; default contiguous for v = 1, v (zig-zag) otherwise")
    costs = parser.add_mutually_exclusive_group()
    costs.add_argument("--costs", default="1,1,1", metavar="FILE|F,I,W",
                       help="a CostModel JSON file, or uniform per-stage times F,I,W (default 1,1,1)")
    costs.add_argument("--costs-file", metavar="FILE", help="a CostModel JSON file (as for simulate)")
    parser.add_argument("--memory-limit", type=int, default=None, metavar="N",
                        help="per-rank activation memory cap: bytes, or (stage, micro-batch) pairs when "
                        "the costs give no sizes; default 1F1B's peak")
    parser.add_argument("--no-split", action="store_true",
                        help="whole backwards only (B), no input/weight-gradient split")
    parser.add_argument("--time-budget", type=float, default=2.0, metavar="SECONDS",
                        help="time for the local search (default 2)")
    parser.add_argument("--save", metavar="FILE", help="write the schedule as pipefold schedule JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the grid")
    parser.set_defaults(func=run_find)


def _load_costs(args: argparse.Namespace, num_stages: int) -> Any:
    if args.costs_file:
        return CostModel.from_json(args.costs_file)
    parts = args.costs.split(",")
    if len(parts) == 3:
        try:
            f, i, w = (float(part) for part in parts)
        except ValueError:
            pass
        else:
            if min(f, i, w) < 0:
                raise ConfigError(f"--costs {args.costs!r}: times must be >= 0")
            return CostModel.uniform(num_stages, f=f, i=i, w=w)
    return CostModel.from_json(args.costs)


def run_find(args: argparse.Namespace) -> int:
    for flag, value in (("--ranks", args.ranks), ("--microbatches", args.microbatches),
                        ("--virtual", args.virtual)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1; got {value}")
    placement: Placement
    if args.placement is not None:
        placement = args.placement
    else:
        placement = "contiguous" if args.virtual == 1 else "v"
    costs = _load_costs(args, args.ranks * args.virtual)
    result = search_schedule(
        costs,
        num_ranks=args.ranks,
        num_microbatches=args.microbatches,
        num_virtual=args.virtual,
        placement=placement,
        memory_limit=args.memory_limit,
        split_backward=not args.no_split,
        time_budget_s=args.time_budget,
    )
    if args.save:
        write_atomic(args.save, dumps(result.schedule))
    best = result.best_family()
    if args.json:
        print(json.dumps({
            "schedule": result.schedule.name, "num_ranks": args.ranks,
            "num_microbatches": args.microbatches, "num_virtual": args.virtual, "placement": placement,
            "makespan": result.makespan, "bubble_fraction": result.bubble_fraction,
            "peak_memory": list(result.peak_memory), "memory_limit": result.memory_limit,
            "memory_unit": result.memory_unit, "origin": result.origin,
            "local_moves": result.local_moves, "evaluations": result.evaluations,
            "best_family": best.name if best else None,
            "families": [
                {"name": c.name, "makespan": c.makespan, "bubble_fraction": c.bubble_fraction,
                 "peak_memory": c.peak_memory, "fits": c.fits}
                for c in result.baselines
            ],
            "actions": [[str(action) for action in row] for row in result.schedule.actions],
            "saved": args.save,
        }))
        return 0
    console = Console()
    console.print(format_grid(result.schedule.actions), highlight=False, markup=False, soft_wrap=True)
    table = Table(title=f"auto vs hand-written families: p={args.ranks} m={args.microbatches} "
                  f"v={args.virtual}, memory limit {result.memory_limit} {result.memory_unit} per rank")
    for column in ("schedule", "makespan", "bubble", "peak memory", "fits"):
        table.add_column(column)
    table.add_row("auto", f"{result.makespan:.4g}", f"{result.bubble_fraction:.4f}",
                  str(max(result.peak_memory)), "yes")
    for candidate in result.baselines:
        table.add_row(candidate.name, f"{candidate.makespan:.4g}", f"{candidate.bubble_fraction:.4f}",
                      str(candidate.peak_memory), "yes" if candidate.fits else "no")
    console.print(table)
    if best is not None:
        gain = 1.0 - result.makespan / best.makespan if best.makespan > 0 else 0.0
        console.print(f"auto makespan {result.makespan:.4g} vs best fitting family {best.name} "
                      f"{best.makespan:.4g} ({gain:+.1%} faster)")
    console.print(f"found from {result.origin}, {result.local_moves} local moves, "
                  f"{result.evaluations} schedules simulated")
    if args.save:
        console.print(f"wrote {args.save}")
    return 0
