"""The options of `python benchmarks/run.py` and the run they start.

    python benchmarks/run.py --quick          # ~1 minute: MLP, 2 ranks, M=8, three schedules
    python benchmarks/run.py                  # the full matrix (2 workloads x 2, 4 ranks x M 4, 8, 16)
    python benchmarks/run.py --workloads transformer --ranks 2 --microbatches 8 --schedules 1f1b zb-v

`main(argv)` parses the options, runs the matrix and prints every configuration as one
JSON line as soon as it is measured; the whole run is written to RESULTS_DIR/<name>.json,
which `python benchmarks/render.py` turns into the BENCHMARKS.md body. DeepSpeed's
pipeline engine is timed as a third column when `import deepspeed` works (install:
`DS_BUILD_OPS=0 pip install deepspeed`). Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness.pairs import PAIRS, SOLO
from benchmarks.harness.quiet import QuietGate
from benchmarks.harness.results import RunOptions
from benchmarks.harness.runner import FULL, OVERHEAD, QUICK, Matrix, run_benchmark
from pipefold.errors import ConfigError, PipefoldError

__all__ = ["build_parser", "main", "matrices_from_args", "options_from_args", "run"]

logger = logging.getLogger(__name__)

_WORKLOADS = ("mlp", "transformer", "tiny")
_QUIET_FIELDS = (
    "workload",
    "schedule",
    "peer_schedule",
    "ranks",
    "microbatches",
    "pipefold_step_s",
    "peer_step_s",
    "ratio",
    "efficiency",
    "peer_efficiency",
    "predicted_step_s",
    "prediction_error",
    "calibrated_predicted_step_s",
    "calibrated_prediction_error",
    "deepspeed_step_s",
    "deepspeed_ratio",
    "skipped",
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark pipefold against torch.distributed.pipelining (and DeepSpeed when installed).",
    )
    configure_parser(parser)
    return parser


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="reduced matrix, about a minute")
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=_WORKLOADS,
        help="default: mlp transformer (quick: mlp); tiny is the per-action overhead probe",
    )
    parser.add_argument("--ranks", nargs="+", type=_positive, help="rank counts (default 2 4; quick: 2)")
    parser.add_argument(
        "--microbatches", nargs="+", type=_positive, help="micro-batch counts (default 4 8 16; quick: 8)"
    )
    parser.add_argument(
        "--schedules",
        nargs="+",
        choices=(*PAIRS, *SOLO),
        help="pipefold schedules (default: every pair with torch, and the searched auto, auto-v)",
    )
    parser.add_argument("--steps", type=_positive, help="timed steps per library (default 7; quick: 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per library (default 2; quick: 1)")
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.10,
        help="largest share of the machine's CPU other processes may use in a kept window (default 0.10)",
    )
    parser.add_argument(
        "--retries", type=int, help="retakes of a disturbed timing window (default 3; quick: 1)"
    )
    parser.add_argument(
        "--peers",
        choices=("auto", "torch", "none"),
        default="auto",
        help="auto: torch, plus deepspeed when it imports; torch: torch only; none: pipefold only",
    )
    parser.add_argument(
        "--no-overhead", action="store_true", help="skip the per-action overhead micro-benchmark"
    )
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="also run the per-action overhead micro-benchmark (tiny workload) after a custom matrix",
    )
    parser.add_argument(
        "--full-batch-threads", type=_positive, default=2, help="threads of the full-batch baseline"
    )
    parser.add_argument(
        "--results-dir", type=Path, default=Path("benchmarks/results"), help="where the JSON results go"
    )
    parser.add_argument(
        "--baseline-before",
        action="store_true",
        help="time the one-process baseline only before the ranks start, not also inside the "
        "alternation on rank 0 (faster, but efficiency then mixes two moments of a drifting machine)",
    )
    parser.add_argument("--name", help="results file name without .json (default: quick or full)")
    parser.add_argument("--seed", type=int, default=0)


def _deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def options_from_args(args: argparse.Namespace) -> RunOptions:
    libraries: tuple[str, ...] = ("pipefold",)
    if args.peers in ("auto", "torch"):
        libraries += ("torch",)
    if args.peers == "auto" and _deepspeed_available():
        libraries += ("deepspeed",)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if warmup < 0:
        raise ConfigError(f"--warmup={warmup} must be >= 0")
    retries = args.retries if args.retries is not None else (1 if args.quick else 3)
    return RunOptions(
        warmup_steps=warmup,
        timed_steps=args.steps or (5 if args.quick else 7),
        libraries=libraries,
        gate=QuietGate(threshold=args.quiet_threshold, max_retries=retries),
        seed=args.seed,
        interleave_baseline=not args.baseline_before,
    )


def matrices_from_args(args: argparse.Namespace) -> list[Matrix]:
    base = QUICK if args.quick else FULL
    matrix = Matrix(
        workloads=tuple(args.workloads or base.workloads),
        ranks=tuple(args.ranks or base.ranks),
        microbatches=tuple(args.microbatches or base.microbatches),
        schedules=tuple(args.schedules or base.schedules),
    )
    for num_ranks in matrix.ranks:
        if num_ranks < 2:
            raise ConfigError(f"--ranks {num_ranks}: a pipeline needs at least 2 ranks")
    customized = any((args.workloads, args.ranks, args.microbatches, args.schedules))
    with_overhead = args.overhead or not (args.quick or args.no_overhead or customized)
    return [matrix, OVERHEAD] if with_overhead else [matrix]


def _line(record: dict[str, Any]) -> str:
    return json.dumps({key: record[key] for key in _QUIET_FIELDS if key in record})


def run(args: argparse.Namespace, command: str = "") -> int:
    """Run the matrix `args` describe; `command` is recorded in the results document."""
    options = options_from_args(args)
    matrices = matrices_from_args(args)
    name = args.name or ("quick" if args.quick else "full")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{name}.json"

    def emit(record: dict[str, Any]) -> None:
        sys.stdout.write(_line(record) + "\n")
        sys.stdout.flush()

    document = run_benchmark(
        matrices,
        options,
        full_batch_threads=args.full_batch_threads,
        on_record=emit,
        command=command,
    )
    path.write_text(json.dumps(document, indent=1))
    logger.info("results written to %s", path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python benchmarks/run.py ARGS`: parse, run, and answer a bad option with its message."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in arguments)
    try:
        return run(args, command.rstrip())
    except PipefoldError as error:
        sys.stderr.write(f"benchmarks/run.py: error: {error}\n")
        return 2
