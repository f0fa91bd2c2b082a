"""`pipefold` entry point: dispatches to one module per subcommand.

Commands that need torch import it only when they run, so `pipefold schedules`
and `pipefold simulate` answer instantly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from pipefold.errors import PipefoldError, PipelineError

EXIT_FAILURE = 1
"""Exit status of a run that failed while running (a PipelineError: a rank failed, a peer died or hung)."""
EXIT_USAGE = 2
"""Exit status of bad input (a flag, a config value, a checkpoint that does not fit), as argparse's."""

# (module, summary). Each module has add_parser(subparsers) registering `func=run`.
_COMMANDS: tuple[tuple[str, str], ...] = (
    ("pipefold.cli.train", "train"),
    ("pipefold.cli.simulate", "simulate"),
    ("pipefold.cli.plan", "plan"),
    ("pipefold.cli.profile", "profile"),
    ("pipefold.cli.schedules", "schedules"),
    ("pipefold.cli.launch", "launch"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipefold",
        description="Pipeline-parallel training for PyTorch: schedules as data, a simulator, a runtime.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, _ in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # A command whose module is absent from this build is simply not offered.
            if error.name and module_name.startswith(error.name):
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = args.func(args)
    except PipefoldError as error:
        print(f"pipefold {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE if isinstance(error, PipelineError) else EXIT_USAGE
    return code
