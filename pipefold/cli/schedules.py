"""`pipefold schedules`: the families with their bubble and memory formulas and legal ranges."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from pipefold.schedule import family, names


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "schedules",
        help="list the schedule families",
        description="List every schedule family with its bubble and memory formulas "
        "(p ranks, m micro-batches, v stages per rank) and its legal parameter range.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per family")
    parser.set_defaults(func=run)


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
