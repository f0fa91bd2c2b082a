"""`pipefold plan`: the fastest pipeline configuration that fits a per-rank memory limit, explained.

    pipefold plan --model gpt --num-layers 24 --d-model 1024 --ranks 4 --batch-size 64 --memory 8GiB
    pipefold plan --costs costs.json --ranks 8 --batch-size 64 --memory 40GiB --top 10
    pipefold plan --model gpt --ranks 4 --memory 2GiB --schedule zb-v --json
    pipefold plan --profile --ranks 4 --batch-size 32 --memory 2GiB   # measure here, calibrate on a run, plan
    pipefold plan --model gpt --devices 8 --batch-size 64 --memory 8GiB    # also choose dp x pp
    pipefold plan --model gpt --ranks 4 --data-parallel 2 --batch-size 64  # 2 replicas of 4 ranks
    pipefold plan --model gpt --devices 8 --max-tensor-parallel 4 --tp-bandwidth 300e9 --memory 4GiB
    pipefold plan --model gpt --megatron --hardware a100-80gb --devices 64 --max-tensor-parallel 8 \
        --num-layers 40 --d-model 6144 --num-heads 48 --seq-len 2048 --vocab-size 51200 --batch-size 1024
    pipefold plan --model models/gpt2 --seq-len 512 --ranks 4 --memory 8GiB --flops 1e14  # Hugging Face
    pipefold plan --model models/llama/config.json --measure --ranks 2 --rows 2            # measured

Costs come from a `ModelCosts` JSON file (`--costs`, e.g. written by `pipefold profile`
or from `pipefold.runtime.profile` results), from a FLOP estimate of the built-in GPT
(`--model gpt`, defaults as `pipefold train`'s model; an estimate, not a measurement),
or from measuring that GPT on this machine first (`--profile`, or `--model gpt --measure`:
what `pipefold profile` does, with its flags, then a short `pipefold train` run of its default
pipeline prices the layers as the ranks run them: `--calibrate-steps`). `--model DIR_OR_CONFIG`
plans a Hugging Face decoder (gpt2, llama, mistral, qwen2; a model directory or a config.json)
as `pipefold train --model` trains it: the layers `pipefold.split` cuts it into, estimated from
the config's sizes (`pipefold.plan.hf_estimate`), or measured with `--measure`; the GPT's size
flags do not apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipefold.cli import plan_calibrate, plan_measure
from pipefold.cli.profile import add_measure_arguments, measure, print_table, profile_rows, write_costs
from pipefold.errors import ConfigError
from pipefold.files import write_atomic
from pipefold.hf.files import inspect_model
from pipefold.plan import ModelCosts, PlanOptions, format_bytes, gpt_costs, parse_bytes, plan
from pipefold.plan.alike import pool_alike
from pipefold.plan.estimate import PRECISION_BYTES, GptEstimate
from pipefold.plan.hardware import load_hardware
from pipefold.plan.hf_estimate import hf_costs
from pipefold.plan.space import is_asynchronous
from pipefold.plan.units import parse_rate
from pipefold.schedule.io import dumps
from pipefold.schedule.registry import build, family
from pipefold.simulate import Link


def _bytes_flag(flag: str) -> Any:
    def parse(text: str) -> int:
        try:
            return parse_bytes(text, what=flag)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _rate_flag(flag: str) -> Any:
    def parse(text: str) -> float:
        try:
            return parse_rate(text, what=flag)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="choose schedule, micro-batches, stages, recompute (and dp x pp x tp) under a memory limit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--costs", metavar="FILE", help="a ModelCosts JSON file (per-layer costs)")
    source.add_argument("--model", metavar="gpt|DIR_OR_CONFIG",
                        help="estimate the costs from FLOPs: of the built-in GPT ('gpt'), or of a Hugging "
                        "Face "
                        "decoder (a model directory or config.json, as pipefold train --model)")
    source.add_argument("--profile", action="store_true",
                        help="measure the built-in GPT here (as pipefold profile), then plan")
    # The schedule flags mean what they mean in `pipefold simulate`, but here they pin a value
    # the planner would otherwise search.
    parser.add_argument("--ranks", type=int,
                        help="pipeline ranks pp (default 4; with --devices: pins pp, searched otherwise)")
    parser.add_argument("--devices", type=int, metavar="N",
                        help="devices in all: search every dp x pp = N (dp replicas of a pp-rank pipeline)")
    parser.add_argument("--data-parallel", type=int, metavar="D",
                        help="pin the data-parallel replicas dp (default 1, or searched with --devices)")
    parser.add_argument("--tensor-parallel", type=int, metavar="T",
                        help="pin the tensor-parallel ranks tp per stage (default 1, or searched with "
                        "--max-tensor-parallel)")
    parser.add_argument("--max-tensor-parallel", type=int, default=1, metavar="T",
                        help="also search tp = 2 .. T ranks per stage where the model's layers split "
                        "(the built-in GPT: degrees dividing its heads); default 1: none")
    parser.add_argument("--schedule", action="append", metavar="NAME",
                        help="consider only this family (repeatable; 'auto' lets searched orders compete "
                        "too); default: every synchronous family and searched orders")
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
    parser.add_argument("--dp-bandwidth", type=_rate_flag("--dp-bandwidth"), metavar="BYTES_PER_S",
                        help="bandwidth of the gradient all-reduce between replicas (default: --bandwidth)")
    parser.add_argument("--dp-latency", type=float, metavar="SECONDS",
                        help="latency per all-reduce step between replicas (default: --latency)")
    parser.add_argument("--zero", action="store_true",
                        help="shard the optimizer state over the dp replicas (ZeRO-1) wherever dp > 1 and "
                        "tp = 1, as pipefold train --zero does")
    parser.add_argument("--shard", choices=("replicate", "zero1", "full", "auto"), default="replicate",
                        help="what the dp replicas shard: replicate (nothing; the default), zero1 (the "
                        "optimizer state, as --zero), full (weights, gradients and optimizer state), or "
                        "auto: each configuration's layouts priced and the fastest that fits chosen")
    parser.add_argument("--sequence-parallel", action="store_true",
                        help="price sequence parallelism wherever tp > 1 (norms, residual stream and stage "
                        "boundaries split by position), as pipefold train --sequence-parallel runs it")
    parser.add_argument("--tp-bandwidth", type=_rate_flag("--tp-bandwidth"), metavar="BYTES_PER_S",
                        help="bandwidth between the tp ranks of a stage (default: --bandwidth)")
    parser.add_argument("--tp-latency", type=float, metavar="SECONDS",
                        help="latency per all-reduce step between tp ranks (default: --latency)")
    parser.add_argument("--cores", type=int, metavar="N",
                        help="all processes share N cores (CPU ranks on one host: cores / threads per "
                        "rank); ranks computing at once split them fairly (default: a device per rank)")
    parser.add_argument("--order-search", type=float, default=1.0, metavar="SECONDS",
                        help="search the order of the choice's and the closest configurations, each for up "
                        "to this long; a searched order faster than every family becomes the choice "
                        "(default 1; 0: off, families only)")
    parser.add_argument("--order-search-total", type=float, default=2.0, metavar="SECONDS",
                        help="seconds all order searches together may take (default 2)")
    parser.add_argument("--max-order-searches", type=int, default=8, metavar="N",
                        help="most configurations whose order is searched (default 8)")
    parser.add_argument("--save-schedule", metavar="FILE",
                        help="write the schedule to run as JSON: the searched order where it is the choice "
                        "or faster than the choice's family, else the family's (pipefold.schedule.io.load "
                        "reads it; pipefold train --schedule-file runs it)")
    plan_measure.add_arguments(parser)
    parser.add_argument("--hardware", metavar="FILE_OR_PRESET",
                        help="a hardware TOML file or a preset (a100-80gb, h100-80gb, cpu): prices every "
                        "collective and send on the link it crosses once the mesh is placed on nodes, "
                        "and --model gpt on its FLOP/s and matmul efficiency; default --memory: the "
                        "device's memory less the reserve")
    parser.add_argument("--dtype", help="with --hardware and --model gpt: the compute dtype (a key of the "
                        "file's peak_flops; default: the file's default_dtype)")
    parser.add_argument("--megatron", action="store_true",
                        help="with --hardware and --model gpt: price Megatron-LM's GPT (dropout, unfused "
                        "attention, vocabulary-parallel embedding and head, mixed-precision Adam) instead "
                        "of the built-in one")
    parser.add_argument("--recompute-attention", action="store_true",
                        help="with --hardware and --model gpt: also search selective recomputation of the "
                        "attention core (Korthikanti et al. 2022)")
    parser.add_argument("--top", type=int, default=5, help="candidates to list (default 5)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    gpt = parser.add_argument_group(
        "--model gpt / --profile (the built-in GPT; defaults are pipefold train's; --flops, "
        "--bytes-per-value and --overhead shape the FLOP estimate only)"
    )
    gpt.add_argument("--num-layers", "--layers", dest="num_layers", type=int, default=4,
                     help="decoder blocks (default 4)")
    gpt.add_argument("--d-model", dest="d_model", type=int, default=128, help="model width (default 128)")
    gpt.add_argument("--num-heads", "--heads", dest="num_heads", type=int, default=4,
                     help="attention heads (default 4)")
    gpt.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default 128)")
    gpt.add_argument("--vocab-size", type=int, default=256, help="vocabulary (default 256 bytes)")
    # Estimate-only flags default to None so a measurement can refuse them when given.
    gpt.add_argument("--flops", type=_rate_flag("--flops"),
                     help="sustained FLOP/s of one device (default 1e12)")
    gpt.add_argument("--bytes-per-value", type=int, help="4 for fp32 (default), 2 for bf16")
    gpt.add_argument("--memory-bandwidth", type=_rate_flag("--memory-bandwidth"), metavar="BYTES/S",
                     help="the device's memory bandwidth, at which --precision bf16/fp16 times autocast's "
                     "weight casts (read fp32, write 16 bits); default the cpu preset's (see the costs line)")
    gpt.add_argument("--precision", choices=tuple(PRECISION_BYTES),
                     help="price activations and boundaries as `pipefold train --precision` sends them "
                     "(bf16/fp16: 2 bytes) and weights as fp32 masters (4 bytes); with --hardware: compute "
                     "in its dtype; with --profile / "
                     "--measure: measure the layers in it, as pipefold profile --precision; default fp32")
    gpt.add_argument("--overhead", type=float, metavar="SECONDS",
                     help="fixed seconds per layer and action (kernel launches); default 0")
    gpt.add_argument("--measure", action="store_true",
                     help="with --model gpt: measure the model here instead of estimating (= --profile)")
    measure = parser.add_argument_group(
        "--profile / --measure (rows default: --batch-size / --microbatches, or / 8 as pipefold train)"
    )
    add_measure_arguments(measure)
    measure.add_argument("--save-costs", metavar="FILE", help="also write the measured ModelCosts JSON here")
    plan_calibrate.add_arguments(measure)
    parser.set_defaults(func=run)


def _hardware_dtype(args: argparse.Namespace) -> tuple[str, int]:
    """The compute dtype ("" where neither --dtype nor --precision names one: the file's default)
    and the weights' bytes (0: the dtype's) of an estimate on a hardware file, which says how fast
    the device is itself."""
    for flag in ("--flops", "--bytes-per-value", "--memory-bandwidth"):
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise ConfigError(
                f"{flag} and --hardware both say how fast the device is; drop {flag} (the hardware file "
                "gives peak FLOP/s per dtype and the matmul efficiency; pick the dtype with --dtype)"
            )
    if args.precision is None:
        return args.dtype or "", 0
    # As pipefold train runs it: 16-bit compute (autocast) over fp32 weights, bf16-pure's bf16 weights.
    dtype = {"bf16": "bf16", "bf16-pure": "bf16", "fp16": "fp16"}.get(args.precision, "fp32")
    if args.dtype is not None and args.dtype != dtype:
        raise ConfigError(f"--dtype {args.dtype} and --precision {args.precision} (computing in {dtype}) "
                          "disagree; give one")
    return dtype, PRECISION_BYTES[args.precision][1]


def _hardware_estimate(args: argparse.Namespace, hardware: Any) -> Any:
    dtype, parameter_bytes = _hardware_dtype(args)
    return GptEstimate(
        num_layers=args.num_layers, d_model=args.d_model, num_heads=args.num_heads, seq_len=args.seq_len,
        vocab_size=args.vocab_size, hardware=hardware, dtype=dtype, megatron=args.megatron,
        overhead_s=0.0 if args.overhead is None else args.overhead, parameter_bytes=parameter_bytes,
    )


def _hf_hardware_estimate(args: argparse.Namespace, hardware: Any) -> ModelCosts:
    """`hf_costs` of the Hugging Face model `--model` on a hardware file: FLOPs at the file's peak
    for the compute dtype times its matrix-product efficiency at one sample's d x d product (the
    estimate has no per-product shapes), element-wise casts at its memory bandwidth, and what the
    layers save as its `device` saves it."""
    for flag, given in (("--megatron", args.megatron), ("--recompute-attention", args.recompute_attention)):
        if given:
            raise ConfigError(f"{flag} shapes the built-in GPT's estimate, not a Hugging Face model's "
                              f"(--model {args.model}); drop {flag}")
    dtype, parameter_bytes = _hardware_dtype(args)
    dtype = dtype or hardware.default_dtype
    value_bytes = 2 if dtype in ("bf16", "fp16") else 4
    parameter_bytes = parameter_bytes or value_bytes
    files = inspect_model(args.model, field="--model")
    width = files.hidden_size
    efficiency = hardware.matmul_for(dtype)(2.0 * args.seq_len * width * width)
    flops = hardware.peak(dtype) * efficiency
    costs = hf_costs(
        files.config, seq_len=args.seq_len, flops=flops, bytes_per_value=value_bytes,
        overhead_s=0.0 if args.overhead is None else args.overhead,
        parameter_bytes_per_value=parameter_bytes, memory_bandwidth=hardware.memory_bandwidth,
        device=hardware.device,
    )
    return dataclasses.replace(
        costs, source=f"{costs.source} (hardware {hardware.name}: its {dtype} peak x {efficiency:.3g})")


def _costs(args: argparse.Namespace, hardware: Any = None) -> Any:
    estimate_only = [flag for flag, given in (("--dtype", args.dtype), ("--megatron", args.megatron),
                                               ("--recompute-attention", args.recompute_attention)) if given]
    if estimate_only and (hardware is None or not args.model or args.measure):
        raise ConfigError(f"{estimate_only[0]} shapes the estimate of --model gpt on a --hardware file; add "
                          f"--hardware (and --model gpt without --measure), or drop {estimate_only[0]}")
    if args.model and not args.measure and hardware is not None:
        if _is_hf(args):
            return _hf_hardware_estimate(args, hardware)
        return _hardware_estimate(args, hardware)
    if args.measure and not args.model:
        raise ConfigError("--measure goes with --model gpt (or use --profile); --costs are already numbers")
    if args.profile or args.measure:
        return _measured_costs(args)
    if args.save_costs:
        raise ConfigError("--save-costs writes measured costs; add --profile (or --model gpt --measure)")
    if args.costs:
        if args.memory_bandwidth is not None:
            raise ConfigError("--memory-bandwidth times the FLOP estimate's weight casts; a --costs file "
                              "prices them itself (cast_s_per_parameter_byte); drop --memory-bandwidth")
        return ModelCosts.from_json(args.costs)
    overhead = 0.0 if args.overhead is None else args.overhead
    if overhead < 0:
        raise ConfigError(f"--overhead = {args.overhead}; give seconds >= 0")
    if args.precision is not None and args.bytes_per_value is not None:
        raise ConfigError(
            f"--precision {args.precision} and --bytes-per-value {args.bytes_per_value} both set the "
            "bytes of a value; give one"
        )
    value_bytes, parameter_bytes = PRECISION_BYTES[args.precision or "fp32"]
    bandwidth, bandwidth_source = _estimate_bandwidth(args)
    if _is_hf(args):
        files = inspect_model(args.model, field="--model")
        costs = hf_costs(
            files.config, seq_len=args.seq_len, flops=1e12 if args.flops is None else args.flops,
            bytes_per_value=args.bytes_per_value or value_bytes, overhead_s=overhead,
            parameter_bytes_per_value=args.bytes_per_value or parameter_bytes, memory_bandwidth=bandwidth,
        )
        return _with_bandwidth_source(costs, bandwidth_source)
    costs = gpt_costs(
        num_layers=args.num_layers, d_model=args.d_model, num_heads=args.num_heads, seq_len=args.seq_len,
        vocab_size=args.vocab_size, flops=1e12 if args.flops is None else args.flops,
        bytes_per_value=args.bytes_per_value or value_bytes, overhead_s=overhead,
        parameter_bytes_per_value=args.bytes_per_value or parameter_bytes, memory_bandwidth=bandwidth,
    )
    return _with_bandwidth_source(costs, bandwidth_source)


def _estimate_bandwidth(args: argparse.Namespace) -> tuple[float, str]:
    """The memory bandwidth at which the FLOP estimate times autocast's weight casts, and where it
    comes from: `--memory-bandwidth`, else the `cpu` preset's (this machine's, measured), so
    bf16/fp16 casts take time as they do under --hardware."""
    if args.memory_bandwidth is not None:
        return args.memory_bandwidth, "--memory-bandwidth"
    preset = load_hardware("cpu").memory_bandwidth
    return preset, "the cpu preset's; give the device's with --memory-bandwidth"


def _with_bandwidth_source(costs: ModelCosts, source: str) -> ModelCosts:
    """`costs` whose description names where its casts' memory bandwidth came from (where it times some)."""
    if not costs.cast_s_per_parameter_byte:
        return costs
    return dataclasses.replace(costs, source=f"{costs.source} ({source})")


def _measured_costs(args: argparse.Namespace) -> Any:
    """Profile the built-in GPT as `pipefold profile` does; show the table unless --json."""
    for flag in ("--flops", "--bytes-per-value", "--overhead", "--memory-bandwidth"):
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise ConfigError(
                f"{flag} shapes the FLOP estimate, but --profile / --measure time the model here (in "
                f"--precision, fixed costs included); drop {flag}, or drop --profile / --measure to estimate"
            )
    steps = plan_calibrate.calibration_steps(args)
    if steps and not _trains_the_planned_model(args) and args.calibrate_steps is not None:
        raise ConfigError(f"--calibrate-steps {steps} trains the model with pipefold train, which reads "
                          "bytes (vocabulary 256); drop --calibrate-steps, or plan --vocab-size 256")
    measured = measure(args, profile_rows(args))
    costs = pool_alike(measured.costs)  # identical blocks timed apart differ by noise only
    calibrated = None
    if steps and _trains_the_planned_model(args):
        # The planned ranks: --ranks, else 4 without --devices (plan's default), else the fewest.
        ranks = args.ranks if args.ranks is not None or args.devices is not None else 4
        calibrated = plan_calibrate.calibrate(args, costs, steps, _is_hf(args), ranks, measured.layer_split())
        costs = calibrated.costs
        args.calibration = calibrated.to_json()
    if args.save_costs:
        write_costs(costs, args.save_costs, flag="--save-costs")
    if not args.json:
        print_table(measured, Console())
        if calibrated is not None:
            Console().print(calibrated.describe(), highlight=False, markup=False, soft_wrap=True)
    return costs


def _is_hf(args: argparse.Namespace) -> bool:
    """Whether `--model` names a Hugging Face model (a directory or config.json), not the built-in GPT."""
    return args.model is not None and args.model != "gpt"


def _check_writable(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise ConfigError(
            f"--save-schedule = {path!r}: the folder {str(parent)!r} does not exist; create it first"
        )
    if Path(path).is_dir():
        raise ConfigError(f"--save-schedule = {path!r} is a folder; give a file name")


def _trains_the_planned_model(args: argparse.Namespace) -> bool:
    """Whether the costs are the built-in GPT's as `pipefold train` builds it (a `--costs` file
    describes any model; train reads bytes, a vocabulary of 256)."""
    if _is_hf(args):
        return True
    from pipefold.data.corpus import VOCAB_SIZE  # torch: the pipefold.data package imports it

    return not args.costs and args.vocab_size == VOCAB_SIZE


def train_command(args: argparse.Namespace, result: Any) -> str | None:
    """The `pipefold train` command that runs the plan's choice on the model planned for, or
    None where the costs are not the built-in GPT's as `pipefold train` builds it (`--costs`
    files describe any model; a vocabulary other than train's byte-level one), and where the
    choice is a searched order but no `--save-schedule FILE` holds it for train to read."""
    choice = result.choice
    if choice.is_searched_order and args.save_schedule is None:
        return None
    saved = args.save_schedule is not None and result.saves_searched_order
    schedule_file = args.save_schedule if saved else None
    words = candidate_words(args, choice, result.global_batch, schedule_file)
    return None if words is None else shlex.join(words)


def candidate_words(args: argparse.Namespace, candidate: Any, global_batch: int,
                    schedule_file: str | None) -> list[str] | None:
    """`pipefold train ...` as words for one planned candidate (a searched order, or the order
    searched for its family, read from `schedule_file`), or None where train cannot run it
    as planned (see `train_command`)."""
    if not _trains_the_planned_model(args):
        return None
    if candidate.recompute_attention and candidate.recompute:
        return None  # the runtime recomputes the attention cores or whole layers, not both at once
    if candidate.is_searched_order and schedule_file is None:
        return None
    if args.megatron and not _is_hf(args) and args.vocab_size % candidate.num_tensor_parallel:
        return None  # its vocabulary-parallel head splits train's byte values evenly over tp
    words = ["pipefold", "train"]
    if schedule_file is not None:
        words += ["--schedule-file", schedule_file]
    else:
        words += ["--schedule", candidate.schedule]
    words += ["--ranks", str(candidate.num_ranks), "--microbatches", str(candidate.num_microbatches)]
    # A searched order's file fixes its stages per rank; a family's default need not be given.
    default_virtual = None if candidate.is_searched_order else family(candidate.schedule).default_virtual
    if default_virtual is not None and candidate.num_virtual != default_virtual:
        words += ["--virtual", str(candidate.num_virtual)]
    if candidate.num_data_parallel > 1:
        words += ["--data-parallel", str(candidate.num_data_parallel)]
    if candidate.num_tensor_parallel > 1:
        words += ["--tensor-parallel", str(candidate.num_tensor_parallel)]
    if candidate.sequence_parallel:
        words += ["--sequence-parallel"]
    if candidate.sharded_optimizer:
        words += ["--zero"]
    if candidate.shard == "full":
        words += ["--shard", "full"]
        if candidate.free_between_microbatches:
            words += ["--free-between-microbatches"]
        if candidate.gather_lookahead:
            words += ["--gather-lookahead", str(candidate.gather_lookahead)]
    words += ["--batch-size", str(global_batch)]
    if _is_hf(args):
        words += ["--model", args.model, "--seq-len", str(args.seq_len)]
    else:
        words += ["--num-layers", str(args.num_layers), "--d-model", str(args.d_model),
                  "--num-heads", str(args.num_heads), "--seq-len", str(args.seq_len)]
    words += ["--partition", ",".join(map(str, candidate.partition.counts))]
    # The precision priced (and measured), named: train's default "auto" may pick bf16.
    words += ["--precision", args.precision or "fp32"]
    if candidate.recompute:
        layers = ",".join(map(str, candidate.recompute_layers))
        words += ["--set", f"recompute=[{layers}]"]
    elif candidate.recompute_attention:
        words += ["--recompute", "selective"]
    if args.megatron:
        # Megatron-LM's GPT: its unfused attention and dropouts at its default probability, and
        # under tp its vocabulary-parallel embedding and head (what --megatron prices).
        words += ["--attention", "unfused", "--dropout", "0.1"]
        if candidate.num_tensor_parallel > 1:
            words += ["--vocab-parallel"]
    asynchronous = not candidate.is_searched_order and is_asynchronous(candidate.schedule)
    if asynchronous and not _is_hf(args):
        words += ["--set", "model.tie_embeddings=false"]  # train refuses a tied head with them
    return words


def _fastest(measured: list[plan_measure.MeasuredCandidate]) -> int:
    return min(measured, key=lambda m: m.measured_s).rank


def _measured_command(
    args: argparse.Namespace, result: Any, measured: list[plan_measure.MeasuredCandidate]
) -> str | None:
    """The train command of the measured fastest; with `--save-schedule FILE` its order is
    written there (a searched order, or its family's), else a searched order has none (None)."""
    candidate = result.top[_fastest(measured) - 1]
    path = args.save_schedule
    if path is not None:
        order = candidate.order if candidate.is_searched_order else build(
            candidate.schedule, num_ranks=candidate.num_ranks, num_microbatches=candidate.num_microbatches,
            num_virtual=candidate.num_virtual)
        write_atomic(path, dumps(order))
        print(f"wrote the measured fastest's order (#{_fastest(measured)}, {candidate.describe()}) to {path}",
              file=sys.stderr)
    if candidate.is_searched_order and path is None:
        return None
    schedule_file = path if candidate.is_searched_order else None
    words = candidate_words(args, candidate, result.global_batch, schedule_file)
    return None if words is None else shlex.join(words)


def _save_schedule(result: Any, path: str) -> None:
    """The chosen searched order, or the one searched for the family choice where it beats the family,
    else the family's own schedule (`Plan.schedule_to_run`)."""
    choice, searched = result.choice, result.searched
    if choice.is_searched_order:
        what = f"the chosen searched order (on {choice.base_family}'s configuration)"
    elif result.saves_searched_order:
        what = f"the searched order ({searched.gain:.3f}x {choice.schedule}'s)"
    else:
        what = f"{choice.schedule}'s order (no searched one was faster)"
    write_atomic(path, dumps(result.schedule_to_run()))
    print(f"wrote {what} to {path}; run it with partition={list(choice.partition.counts)}", file=sys.stderr)


def _held_cell(candidate: Any) -> str:
    """The largest extra F a rank of `candidate` pays for the activations it holds, and the rank."""
    extra = [f for f, _ in candidate.held_slowdown]
    if not extra or max(extra) <= 0:
        return "-"
    rank = max(range(len(extra)), key=extra.__getitem__)
    return f"+{extra[rank]:.1%} ({rank})"


def _degree_cell(candidate: Any, with_tp: bool) -> str:
    cell = f"{candidate.num_data_parallel} x {candidate.num_ranks}"
    return f"{cell} x {candidate.num_tensor_parallel}" if with_tp else cell


def _override(link: Any, bandwidth: float | None, latency: float | None) -> Any:
    """`link` with what the flags give instead, or None (the default link) where they give nothing."""
    if bandwidth is None and latency is None:
        return None
    return Link(latency=link.latency if latency is None else latency,
                bandwidth=link.bandwidth if bandwidth is None else bandwidth)


def run(args: argparse.Namespace) -> int:
    for flag, latency in (("--latency", args.latency), ("--dp-latency", args.dp_latency),
                          ("--tp-latency", args.tp_latency)):
        if latency is not None and (latency < 0 or not math.isfinite(latency)):
            raise ConfigError(f"{flag} = {latency}; give seconds >= 0")
    if not (0 <= args.order_search < math.inf):
        raise ConfigError(f"--order-search = {args.order_search}; give seconds >= 0 (0: no order search)")
    if not (0 <= args.order_search_total < math.inf):
        raise ConfigError(f"--order-search-total = {args.order_search_total}; give seconds >= 0")
    if args.max_order_searches < 1:
        raise ConfigError(f"--max-order-searches = {args.max_order_searches}; give a count >= 1")
    link = Link(latency=args.latency, bandwidth=args.bandwidth or math.inf)
    dp_link = _override(link, args.dp_bandwidth, args.dp_latency)
    tp_link = _override(link, args.tp_bandwidth, args.tp_latency)
    hardware = None if args.hardware is None else load_hardware(args.hardware)
    if hardware is not None:
        flags = (("--bandwidth", args.bandwidth), ("--latency", args.latency),
                 ("--dp-bandwidth", args.dp_bandwidth), ("--dp-latency", args.dp_latency),
                 ("--tp-bandwidth", args.tp_bandwidth), ("--tp-latency", args.tp_latency))
        given = [flag for flag, value in flags if value]
        if given:
            raise ConfigError(
                f"{given[0]} given with --hardware {args.hardware}, whose links price every collective and "
                f"send by where it runs (inside a node or across); drop {given[0]}, or edit the file's "
                "[links]"
            )
        link, dp_link, tp_link = Link(), None, None
    # Without --devices, --ranks keeps its old default of 4: one pipeline, as before dp existed.
    # A mix of device kinds in the hardware file fixes the devices: pp is searched there.
    mixed = hardware is not None and hardware.num_devices is not None
    ranks = 4 if args.ranks is None and args.devices is None and not mixed else args.ranks
    options = PlanOptions(
        num_ranks=ranks,
        num_devices=args.devices,
        data_parallel=args.data_parallel,
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
        link=link,
        dp_link=dp_link,
        tensor_parallel=args.tensor_parallel,
        max_tensor_parallel=args.max_tensor_parallel,
        tp_link=tp_link,
        zero=args.zero,
        shard=args.shard,
        sequence_parallel=args.sequence_parallel,
        num_cores=args.cores,
        order_search_s=args.order_search,
        order_search_total_s=args.order_search_total,
        max_order_searches=args.max_order_searches,
        hardware=hardware,
        recompute_attention=args.recompute_attention,
    )
    plan_measure.check_arguments(args)
    plan_calibrate.calibration_steps(args)  # refuses bad values before anything is measured
    if args.measure_top and not _trains_the_planned_model(args):
        raise ConfigError(
            "--measure-top trains the planned model with pipefold train, which builds the built-in GPT "
            "(vocabulary 256) or a Hugging Face model (--model DIR), not a --costs file; plan with "
            "--profile, or drop --measure-top"
        )
    if args.save_schedule is not None:
        _check_writable(args.save_schedule)
    costs = _costs(args, hardware)
    calibration = getattr(args, "calibration", None)
    if calibration is not None and hardware is None and args.latency == 0 and args.bandwidth is None:
        # No link given: messages between ranks cost what the calibration run measured per message.
        options = dataclasses.replace(options, link=Link(latency=calibration["message_latency_s"]))
    result = plan(costs, options)
    measured: list[plan_measure.MeasuredCandidate] = []
    if args.measure_top:
        measured = plan_measure.measure_top(
            args, result, lambda candidate, path: candidate_words(args, candidate, result.global_batch, path))
    if measured:
        command = _measured_command(args, result, measured)
    else:
        if args.save_schedule is not None:
            _save_schedule(result, args.save_schedule)
        command = train_command(args, result)
    allreduce_free = hardware is None and (
        options.allreduce_link.bandwidth == math.inf and options.allreduce_link.latency == 0)
    if allreduce_free and (result.num_devices is not None or result.num_data_parallel > 1):
        # An ideal link prices the all-reduce at 0, so more replicas always look better; say so
        # rather than let the plan read as a measurement of the interconnect.
        print("note: no --dp-bandwidth / --bandwidth given, so the gradient all-reduce between replicas "
              "costs 0 here and data parallelism looks free; give the interconnect's bandwidth "
              "(e.g. --dp-bandwidth 25e9) for a plan that weighs it", file=sys.stderr)
    if args.json:
        extra: dict[str, Any] = {}
        if getattr(args, "calibration", None) is not None:
            extra["calibration"] = args.calibration
        if measured:
            extra["measured"] = [m.to_json() for m in measured]
            extra["measured_fastest"] = min(measured, key=lambda m: m.measured_s).rank
        print(json.dumps({**result.to_json(), "train_command": command, **extra}))
        return 0

    console = Console()
    limit = "no limit" if math.isinf(result.memory_limit) else format_bytes(result.memory_limit)
    # The dp (and tp) columns appear only when they are in play, so a plain plan reads as before.
    with_tp = options.searches_tensor_parallel
    with_dp = result.num_devices is not None or result.num_data_parallel > 1 or with_tp
    if result.num_devices is not None:
        devices = f"{result.num_devices} devices (dp x pp{' x tp' if with_tp else ''} searched)"
    else:
        devices = f"p={result.num_ranks}" + (f", dp={result.num_data_parallel}" if with_dp else "")
    table = Table(title=f"top {len(result.top)} of {devices}, batch {result.global_batch}, "
                  f"memory {limit} per rank")
    degree_column = "dp x pp x tp" if with_tp else "dp x pp"
    columns = ["#", *([degree_column] if with_dp else []), "schedule", "v", "m x rows", "recompute", "step s",
               *(["all-reduce s"] if with_dp else []), "bubble", "peak (rank)"]
    # A column for the activations held only where a candidate's ranks pay for them (a CPU
    # calibration's slope: pipefold.plan.held_cost).
    with_held = any(candidate.held_text() for candidate in result.top)
    if with_held:
        columns.append("held F (rank)")
    for column in columns:
        table.add_column(column, justify="left" if column in ("schedule", "recompute") else "right",
                         overflow="fold")
    for index, candidate in enumerate(result.top, start=1):
        table.add_row(
            str(index), *([_degree_cell(candidate, with_tp)] if with_dp else []),
            candidate.schedule_text, str(candidate.num_virtual),
            f"{candidate.num_microbatches} x {candidate.microbatch_rows}", candidate.recompute_text,
            f"{candidate.step_time:.4g}", *([f"{candidate.allreduce_s:.3g}"] if with_dp else []),
            f"{candidate.bubble_fraction:.1%}",
            f"{format_bytes(candidate.peak_memory)} ({candidate.peak_rank})",
            *([_held_cell(candidate)] if with_held else []),
        )
    console.print(table)
    console.print(result.explain(), highlight=False, markup=False, soft_wrap=True)
    if hardware is not None:
        console.print(f"  hardware: {hardware.name} ({hardware.source}); {result.choice.placed}",
                      highlight=False, markup=False, soft_wrap=True)
    if measured:
        console.print(plan_measure.measured_text(measured, args), highlight=False, markup=False,
                      soft_wrap=True)
    fastest_searched = bool(measured) and result.top[_fastest(measured) - 1].is_searched_order
    if command is not None:
        what = "the measured fastest" if measured else "it"
        console.print(f"run {what}: {command}", highlight=False, markup=False, soft_wrap=True)
    elif fastest_searched:
        console.print("run the measured fastest: add --save-schedule FILE (a searched order, which pipefold "
                      "train runs with --schedule-file FILE) and plan again", highlight=False,
                      markup=False, soft_wrap=True)
    elif not measured and result.choice.is_searched_order and _trains_the_planned_model(args):
        # train reads a searched order from a file, which only --save-schedule writes.
        console.print("run it: add --save-schedule FILE (the choice is a searched order, which pipefold "
                      "train runs with --schedule-file FILE) and plan again", highlight=False,
                      markup=False, soft_wrap=True)
    return 0
