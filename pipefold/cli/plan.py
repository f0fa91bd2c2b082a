"""`pipefold plan`: the fastest pipeline configuration that fits a per-rank memory limit, explained.

    pipefold plan --model gpt --num-layers 24 --d-model 1024 --ranks 4 --batch-size 64 --memory 8GiB
    pipefold plan --costs costs.json --ranks 8 --batch-size 64 --memory 40GiB --top 10
    pipefold plan --model gpt --ranks 4 --memory 2GiB --schedule zb-v --json

Costs come from a `ModelCosts` JSON file (`--costs`, e.g. written from
`pipefold.model.profile` results) or from a FLOP estimate of the built-in GPT
(`--model gpt`, defaults as `pipefold train`'s model; an estimate, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from pipefold.errors import ConfigError


def _bytes_flag(flag: str) -> Any:
    def parse(text: str) -> int:
        from pipefold.plan import parse_bytes

        try:
            return parse_bytes(text, what=flag)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _rate_flag(flag: str) -> Any:
    def parse(text: str) -> float:
        from pipefold.plan.units import parse_rate

        try:
            return parse_rate(text, what=flag)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="choose schedule, micro-batches, stages and recompute under a memory limit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--costs", metavar="FILE", help="a ModelCosts JSON file (per-layer costs)")
    source.add_argument("--model", choices=("gpt",), help="estimate the built-in GPT's costs from FLOPs")
    # The schedule flags mean what they mean in `pipefold simulate`, but here they pin a value
    # the planner would otherwise search.
    parser.add_argument("--ranks", type=int, default=4, help="pipeline ranks p (default 4)")
    parser.add_argument("--schedule", action="append", metavar="NAME",
                        help="consider only this family (repeatable); default: every synchronous one")
    parser.add_argument("--microbatches", type=int, help="pin the micro-batch count m")
    parser.add_argument("--virtual", type=int, help="pin the stages per rank v")
    parser.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=32,
                        help="samples per optimizer step (default 32, as pipefold train)")
    parser.add_argument("--memory", type=_bytes_flag("--memory"), metavar="SIZE",
                        help="per-rank memory limit, e.g. 8GiB or 512MB (default: no limit)")
    parser.add_argument("--recompute", choices=("auto", "none", "full"), default="auto",
                        help="auto searches which stages to recompute (default); none or full pins it")
    parser.add_argument("--allow-async", action="store_true",
                        help="also consider pipedream and pipedream-2bw (weight stashing)")
    parser.add_argument("--uneven", action="store_true",
                        help="also try micro-batch counts that do not divide the batch")
    parser.add_argument("--max-virtual", type=int, default=4, help="largest v searched (default 4)")
    parser.add_argument("--max-microbatches", type=int, help="largest m searched (default: the batch)")
    parser.add_argument("--bandwidth", type=_rate_flag("--bandwidth"), metavar="BYTES_PER_S",
                        help="link bandwidth between ranks, e.g. 50e9 (default: free transfers)")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                        help="link latency per message (default 0)")
    parser.add_argument("--top", type=int, default=5, help="candidates to list (default 5)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    gpt = parser.add_argument_group("--model gpt (a FLOP estimate; defaults are pipefold train's)")
    gpt.add_argument("--num-layers", "--layers", dest="num_layers", type=int, default=4,
                     help="decoder blocks (default 4)")
    gpt.add_argument("--d-model", dest="d_model", type=int, default=128, help="model width (default 128)")
    gpt.add_argument("--num-heads", "--heads", dest="num_heads", type=int, default=4,
                     help="attention heads (default 4)")
    gpt.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    gpt.add_argument("--vocab-size", type=int, default=256, help="vocabulary (default 256 bytes)")
    gpt.add_argument("--flops", type=_rate_flag("--flops"), default=1e12,
                     help="sustained FLOP/s of one device (default 1e12)")
    gpt.add_argument("--bytes-per-value", type=int, default=4, help="4 for fp32 (default), 2 for bf16")
    gpt.add_argument("--overhead", type=float, default=0.0, metavar="SECONDS",
                     help="fixed seconds per layer and action (kernel launches); default 0")
    parser.set_defaults(func=run)


def _costs(args: argparse.Namespace) -> Any:
    from pipefold.plan import ModelCosts, gpt_costs

    if args.costs:
        return ModelCosts.from_json(args.costs)
    if args.overhead < 0:
        raise ConfigError(f"--overhead = {args.overhead}; give seconds >= 0")
    return gpt_costs(
        num_layers=args.num_layers, d_model=args.d_model, num_heads=args.num_heads, seq_len=args.seq_len,
        vocab_size=args.vocab_size, flops=args.flops, bytes_per_value=args.bytes_per_value,
        overhead_s=args.overhead,
    )


def run(args: argparse.Namespace) -> int:
    from pipefold.plan import PlanOptions, format_bytes, plan
    from pipefold.simulate import Link

    if args.latency < 0 or not math.isfinite(args.latency):
        raise ConfigError(f"--latency = {args.latency}; give seconds >= 0")
    options = PlanOptions(
        num_ranks=args.ranks,
        global_batch=args.batch_size,
        memory_limit=math.inf if args.memory is None else args.memory,
        schedules=tuple(args.schedule or ()),
        microbatches=args.microbatches,
        virtual=args.virtual,
        recompute=args.recompute,
        allow_async=args.allow_async,
        uneven=args.uneven,
        max_virtual=args.max_virtual,
        max_microbatches=args.max_microbatches,
        top=args.top,
        link=Link(latency=args.latency, bandwidth=args.bandwidth or math.inf),
    )
    result = plan(_costs(args), options)
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    limit = "no limit" if math.isinf(result.memory_limit) else format_bytes(result.memory_limit)
    table = Table(title=f"top {len(result.top)} of p={result.num_ranks}, batch {result.global_batch}, "
                  f"memory {limit} per rank")
    for column in ("#", "schedule", "v", "m x rows", "recompute", "step s", "bubble", "peak (rank)"):
        table.add_column(column, justify="left" if column in ("schedule", "recompute") else "right",
                         overflow="fold")
    for index, candidate in enumerate(result.top, start=1):
        table.add_row(
            str(index), candidate.schedule, str(candidate.num_virtual),
            f"{candidate.num_microbatches} x {candidate.microbatch_rows}", candidate.recompute_text,
            f"{candidate.step_time:.4g}", f"{candidate.bubble_fraction:.1%}",
            f"{format_bytes(candidate.peak_memory)} ({candidate.peak_rank})",
        )
    console.print(table)
    console.print(result.explain(), highlight=False, markup=False, soft_wrap=True)
    return 0
