"""`pipefold profile`: measure what each layer of the built-in GPT costs here, for the planner.

    pipefold profile                                          # pipefold train's model, CPU, 1 thread
    pipefold profile --num-layers 12 --d-model 768 --num-heads 12 --device cuda --out costs.json
    pipefold plan --costs costs.json --ranks 4 --batch-size 32 --memory 8GiB
    pipefold plan --profile --ranks 4 --memory 2GiB           # measure, then plan, in one command
    pipefold profile --model models/gpt2 --seq-len 256 --out costs.json   # a Hugging Face model
    pipefold profile --precision bf16 --out costs.json        # as pipefold train --precision bf16 runs

Each layer of `pipefold.model.zoo.gpt_layers` (the model `pipefold train` builds from the
same flags) runs alone on one micro-batch of `--rows` sequences (default: the largest
micro-batch of `--batch-size` cut into `--microbatches`, as training cuts it): its forward
(F), its whole backward (B), and its backward split into input (I) and weight (W) gradients
as zero-bubble schedules run them (`pipefold.runtime.backward`). Times are medians of
`--repeats` runs. The table gives milliseconds and MiB per layer; `--out` writes the
`pipefold.plan.ModelCosts` JSON that `pipefold plan --costs` reads.

`--precision` (fp32 by default; bf16, fp16, bf16-pure: `pipefold train --precision`'s values)
measures the layers as the training ranks run them in it: the forward under autocast in 16
bits with fp32 weights (bf16-pure: bf16 weights), the weight casts held for the step, the
boundaries in 16 bits. Times, activation bytes and boundary bytes are the precision's own; the
costs price weights, gradients and optimizer state as the runtime keeps them (fp32 weights and
Adam moments; bf16-pure: bf16 weights and gradients, fp32 master and moments in the optimizer)
and the 16-bit weight copies autocast holds for a step (each layer's `cast_bytes`).

`--model DIR_OR_CONFIG` measures a Hugging Face decoder instead (a model directory or a
config.json; random weights from its config: times do not depend on the values): the layers
`pipefold.split` cuts it into and `pipefold train --model` trains (prefix, each block,
suffix), on `--seq-len` tokens; the GPT's size flags do not apply.

`--hardware FILE` measures the device instead (or as well, with `--out` or `--json`) and writes a
hardware file that `pipefold plan --hardware FILE` reads: matrix-product efficiency by FLOPs over
a transformer layer's shapes in each of `--dtypes` (peak: the fastest measured, or
`--peak-flops DTYPE=X`), memory bandwidth from a large copy, memory per device and an assumed
reserve (`--memory-per-device`, `--reserve`), devices per node, and the links: measured where
this machine can (CPU: the shared-memory path; CUDA with 2+ GPUs: a device-to-device copy),
else from `--links-from PRESET_OR_FILE` or `--intra-node`/`--inter-node BANDWIDTH,LATENCY`
(refused when neither is given). All within `--budget` seconds (30 by default); the file's
comments say what was measured and what assumed. docs/plan.md, "Hardware files".

    pipefold profile --hardware here.toml                   # this CPU, fp32, one thread
    pipefold profile --hardware h100.toml --device cuda --links-from h100-80gb --devices-per-node 8

Any other model, from Python:

    from pipefold.runtime import profile
    from pipefold.plan import ModelCosts
    costs = ModelCosts.from_profile(profile(layers, sample, split_backward=True), rows=len(sample))
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipefold.cli.profile_hardware import add_hardware_arguments, measure_hardware, summary, write_hardware
from pipefold.errors import ConfigError
from pipefold.job.sections import ScheduleConfig
from pipefold.plan import ModelCosts
from pipefold.plan.calibrate import with_fixed_costs
from pipefold.plan.tensor import with_gpt_tensor_parallel
from pipefold.plan.update_memory import layer_norm_bytes, update_temporaries

if TYPE_CHECKING:
    from rich.console import Console

    from pipefold.runtime import LayerProfile

_ID_BYTES = 8
"""Token ids are int64: what stage 0 keeps of the model input."""

PROFILE_PRECISIONS = ("fp32", "bf16", "fp16", "bf16-pure")
"""What `--precision` may be: `pipefold train --precision`'s values ("auto" resolved by train only)."""

_PURE_OPTIMIZER_BYTES = 6.0
"""Optimizer state per byte of a bf16 weight (bf16-pure): AdamW's two moments and the master
copy, each fp32 (`pipefold.runtime.master.fp32_master_weights`): 12 bytes per 2-byte weight."""


@dataclass(frozen=True)
class GptProfile:
    """A measured GPT: the planner's costs plus what the table shows beyond them."""

    costs: ModelCosts
    profiles: tuple[LayerProfile, ...]
    names: tuple[str, ...]
    rows: int
    seq_len: int
    device: str
    """The device in words ("cpu, 1 thread", "cuda:0 NVIDIA H100 80GB HBM3")."""

    def layer_split(self) -> tuple[tuple[float, float, float], ...] | None:
        """Per layer, the profile's I, W and B seconds (timed apart, one process): what
        `pipefold plan --profile` pools the calibration's split share with
        (`pipefold.plan.split_fit.profile_split_share`); None where a layer's I/W was not timed."""
        if any(p.input_grad_s is None or p.weight_grad_s is None for p in self.profiles):
            return None
        return tuple((float(p.input_grad_s or 0.0), float(p.weight_grad_s or 0.0), p.backward_s)
                     for p in self.profiles)


def add_measure_arguments(parser: Any) -> None:
    """The flags of a measurement, shared by `pipefold profile` and `pipefold plan --profile`."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to measure; auto: CUDA when available, else CPU (default)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads torch uses (default on CPU: 1, as each rank of pipefold train)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N",
                        help="timed runs per layer, the median is kept (default 5; profile --hardware: "
                        "samples per figure, the best is kept)")
    parser.add_argument("--rows", type=int, metavar="N",
                        help="sequences per profiled micro-batch (default: batch size / micro-batches, "
                        "rounded up)")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure the built-in GPT's per-layer costs (F, B, I, W, memory) for pipefold plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model (pipefold train's flags and defaults)")
    model.add_argument("--model", metavar="DIR_OR_CONFIG",
                       help="a Hugging Face model directory or config.json (as pipefold train --model); "
                       "default: the built-in GPT the flags below describe")
    model.add_argument("--num-layers", "--layers", dest="num_layers", type=int, default=4,
                       help="decoder blocks (default 4)")
    model.add_argument("--d-model", dest="d_model", type=int, default=128, help="model width (default 128)")
    model.add_argument("--num-heads", "--heads", dest="num_heads", type=int, default=4,
                       help="attention heads (default 4)")
    model.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    model.add_argument("--vocab-size", type=int, default=256, help="vocabulary (default 256 bytes)")
    model.add_argument("--untied", action="store_true",
                       help="an output head of its own (pipefold train's model.tie_embeddings=false)")
    model.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=32,
                       help="sequences per step (default 32)")
    model.add_argument("--microbatches", type=int,
                       help=f"micro-batches per step (default {ScheduleConfig.num_microbatches}, "
                       "at most the batch)")
    add_measure_arguments(parser)
    parser.add_argument("--precision", choices=PROFILE_PRECISIONS, default="fp32",
                        help="measure as pipefold train --precision runs the layers (default fp32)")
    parser.add_argument("--out", metavar="FILE", help="write the ModelCosts JSON here (for plan --costs)")
    parser.add_argument("--json", action="store_true", help="print the ModelCosts JSON instead of the table")
    add_hardware_arguments(parser)
    parser.set_defaults(func=run)


def _positive(flag: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{flag} = {value!r}; give an integer >= 1")


def profile_rows(args: argparse.Namespace) -> int:
    """Sequences per profiled micro-batch: `--rows`, else the batch's largest micro-batch."""
    if args.rows is not None:
        _positive("--rows", args.rows)
        return int(args.rows)
    _positive("--batch-size", args.batch_size)
    _positive("--microbatches", args.microbatches)
    # Unpinned, pipefold train's count, capped so a small batch still gives whole rows.
    microbatches: int = args.microbatches or min(ScheduleConfig.num_microbatches, args.batch_size)
    batch_size: int = args.batch_size
    if microbatches > batch_size:
        raise ConfigError(
            f"--microbatches = {microbatches} exceeds --batch-size = {batch_size}; every micro-batch "
            "needs at least one sequence (fewer micro-batches, or --rows N)"
        )
    # The largest micro-batch, as the planner prices an uneven cut at its largest.
    return math.ceil(batch_size / microbatches)


def measure_gpt(args: argparse.Namespace, rows: int) -> GptProfile:
    """Profile `gpt_layers` as the flags in `args` describe it, I/W split included."""
    for flag in ("--num-layers", "--d-model", "--num-heads", "--seq-len", "--vocab-size", "--repeats",
                 "--threads"):
        _positive(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.d_model % args.num_heads:
        raise ConfigError(
            f"--num-heads = {args.num_heads} does not divide --d-model = {args.d_model}; "
            "pick a head count that divides the width (e.g. 4 for 128)"
        )
    import torch

    from pipefold.model import tied_groups
    from pipefold.model.spec import TiedLayerSpec, layer_name
    from pipefold.model.zoo import gpt_layers, gpt_loss
    from pipefold.runtime import profile

    device, threads = _device_and_threads(args)
    precision = _precision(args, device)
    layers = gpt_layers(args.vocab_size, args.d_model, args.num_heads, args.num_layers, args.seq_len,
                        tie_embeddings=not getattr(args, "untied", False))
    # A generator of its own, so profiling leaves the caller's random stream where it was.
    ids = torch.randint(0, args.vocab_size, (rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    # The last layer's activations include what the loss saves (its log-probabilities), as the
    # last stage of `pipefold train` holds them per micro-batch in flight.
    with_loss = functools.partial(profile, loss_fn=gpt_loss, target=ids, precision=precision)
    profiles, where = _profile(layers, ids, device, threads, args.repeats, with_loss)
    source = (
        f"measured on {_in(where, precision)}, median of {args.repeats}: GPT (layers={args.num_layers}, "
        f"d_model={args.d_model}, heads={args.num_heads}, seq_len={args.seq_len}, vocab={args.vocab_size}), "
        f"{rows} rows per micro-batch"
    )
    # The tied embedding and head are one module: full sharding gathers them on one rank as one.
    tied = tuple(indices for indices in tied_groups(layers).values() if len(indices) > 1)
    # Token ids take no gradient: the first stage's backward has no input half.
    costs = ModelCosts.from_profile(profiles, rows=rows, input_bytes=rows * args.seq_len * _ID_BYTES,
                                    source=source, tied_layers=tied, input_requires_grad=False,
                                    **_state_bytes(precision), **_update_fields(layers, device, precision),
                                    # The CPU runtime keeps its receive buffers between steps.
                                    keeps_receive_buffers=device == "cpu")
    costs = _with_update_split(costs, layers)

    def at(other_rows: int) -> list[LayerProfile]:
        other = torch.randint(0, args.vocab_size, (other_rows, args.seq_len),
                              generator=torch.Generator().manual_seed(0))
        return _profile(layers, other, device, threads, args.repeats,
                        functools.partial(profile, loss_fn=gpt_loss, target=other, precision=precision))[0]

    costs = _with_overheads(costs, at, layers, device, threads, precision)
    # What `pipefold train --tensor-parallel` splits, so the planner can price a tp degree.
    costs = with_gpt_tensor_parallel(
        costs, num_layers=args.num_layers, d_model=args.d_model, num_heads=args.num_heads
    )

    def name(layer: Any) -> str:
        if isinstance(layer, TiedLayerSpec) and layer.forward_fn is not None:
            return f"{getattr(layer.forward_fn, '__name__', 'forward_fn')} (tied {layer.key!r})"
        return layer_name(layer)

    names = tuple(name(layer) for layer in layers)
    return GptProfile(costs, tuple(profiles), names, rows, args.seq_len, where)


def measure_hf(args: argparse.Namespace, rows: int) -> GptProfile:
    """Profile the `pipefold.split` layers of the Hugging Face decoder `args.model` (random weights
    from its config) on `rows` x `args.seq_len` tokens, I/W split included."""
    from pipefold.hf.files import inspect_model

    files = inspect_model(args.model, field="--model")
    for flag in ("--seq-len", "--repeats", "--threads"):
        _positive(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.seq_len > files.max_positions:
        raise ConfigError(
            f"--seq-len = {args.seq_len} exceeds the {files.max_positions} positions of {files.config_path}; "
            f"give at most {files.max_positions}"
        )
    import torch

    from pipefold.hf.model import load_causal_lm, next_token_loss
    from pipefold.model.spec import layer_name
    from pipefold.model.split import SplitPiece
    from pipefold.model.ties import layer_ties
    from pipefold.runtime import profile

    device, threads = _device_and_threads(args)
    precision = _precision(args, device)
    lm = load_causal_lm(files.config_path, seq_len=args.seq_len)
    ids = torch.randint(0, files.vocab_size, (rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    # With train's loss: what it saves (fp32 log-probabilities, as large as the logits) is the last
    # stage's per micro-batch in flight, and its backward's two logits-sized gradients a temporary
    # (`loss_bytes`, `loss_backward_bytes`); without it `plan --model DIR --measure` priced neither
    # and was up to 15% under the CPU allocator's peak of GPipe's last rank (BENCHMARKS.md, h-hfpeaks).
    with_loss = functools.partial(profile, loss_fn=next_token_loss, target=ids, precision=precision)
    profiles, where = _profile(lm.layers, ids, device, threads, args.repeats, with_loss)
    source = (
        f"measured on {_in(where, precision)}, median of {args.repeats}: Hugging Face {files.model_type} "
        "from "
        f"{files.config_path} (blocks={files.num_layers}, hidden={files.hidden_size}, "
        f"heads={files.num_heads}, "
        f"vocab={files.vocab_size}), seq_len={args.seq_len}, {rows} rows per micro-batch"
    )
    # The layers holding one weight (a tied head), as the Pipeline finds them; fp32 as loaded
    # (bf16-pure: held in bf16).
    ties = layer_ties(lm.layers)
    value_bytes = 2 if precision == "bf16-pure" else 4
    costs = ModelCosts.from_profile(profiles, rows=rows, input_bytes=rows * args.seq_len * _ID_BYTES,
                                    source=source, input_requires_grad=False,
                                    tied_layers=tuple(group for group, _ in ties),
                                    tied_parameter_bytes=tuple(value_bytes * values for _, values in ties),
                                    **_state_bytes(precision), **_update_fields(lm.layers, device, precision),
                                    # The CPU runtime keeps its receive buffers between steps.
                                    keeps_receive_buffers=device == "cpu")
    costs = _with_update_split(costs, lm.layers)

    def at(other_rows: int) -> list[LayerProfile]:
        other = torch.randint(0, files.vocab_size, (other_rows, args.seq_len),
                              generator=torch.Generator().manual_seed(0))
        return _profile(lm.layers, other, device, threads, args.repeats, functools.partial(
            profile, loss_fn=next_token_loss, target=other, precision=precision))[0]

    costs = _with_overheads(costs, at, lm.layers, device, threads, precision)
    names = tuple(
        f"{layer.kind} {', '.join(layer.paths)}" if isinstance(layer, SplitPiece) else layer_name(layer)
        for layer in lm.layers
    )
    return GptProfile(costs, tuple(profiles), names, rows, args.seq_len, where)


def _with_overheads(
    costs: ModelCosts, at: Callable[[int], list[LayerProfile]], layers: Any, device: str, threads: int | None,
    precision: str = "fp32",
) -> ModelCosts:
    """`costs` with what a step costs beyond the layers' time at the measured rows: each layer's
    fixed seconds per call (measured again at one row, or two where the costs are of one), the
    runtime's seconds per action and the optimizer update's per parameter byte
    (pipefold.plan.calibrate, pipefold.runtime.overheads)."""
    import dataclasses

    import torch

    from pipefold.model.build import as_layers, build_reference
    from pipefold.runtime.overheads import action_overhead, update_seconds_per_byte

    other_rows = 1 if costs.reference_rows > 1 else 2
    other = ModelCosts.from_profile(at(other_rows), rows=other_rows)
    costs = _with_fixed_temporaries(with_fixed_costs(costs, other), other)
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            model = build_reference(as_layers(layers), torch.device(device), seed=0)
        per_action = action_overhead(device)
        per_byte = update_seconds_per_byte(model.parameters(), precision=precision)
    finally:
        torch.set_num_threads(previous_threads)
    return dataclasses.replace(
        costs, action_overhead_s=per_action, update_s_per_parameter_byte=per_byte,
        source=f"{costs.source}; runtime {per_action * 1e6:.0f} us per action, optimizer update "
        f"{per_byte * 2**20 * 1e3:.2f} ms per MiB of parameters",
    )


def _with_fixed_temporaries(costs: ModelCosts, other: ModelCosts) -> ModelCosts:
    """`costs` with each layer's `backward_temporary_fixed_bytes`: the intercept of the line through
    its backward's temporaries at `costs`' rows and at `other`'s (a new weight gradient is as large
    whatever the rows), kept within [0, the temporaries at `costs`' rows]."""
    import dataclasses

    rows, other_rows = costs.reference_rows, other.reference_rows
    layers = []
    for layer, at_other in zip(costs.layers, other.layers, strict=True):
        slope = (layer.backward_temporary_bytes - at_other.backward_temporary_bytes) / (rows - other_rows)
        fixed = round(layer.backward_temporary_bytes - slope * rows)
        layers.append(dataclasses.replace(
            layer, backward_temporary_fixed_bytes=min(max(fixed, 0), layer.backward_temporary_bytes)))
    return dataclasses.replace(costs, layers=tuple(layers))


def _precision(args: argparse.Namespace, device: str) -> str:
    """`--precision`, checked against the device (fp32 where the command has no such flag)."""
    precision: str = getattr(args, "precision", None) or "fp32"
    if precision not in PROFILE_PRECISIONS:
        raise ConfigError(f"--precision = {precision!r}; measure in one of {', '.join(PROFILE_PRECISIONS)} "
                          "(pipefold train resolves 'auto' itself: name the precision it chose)")
    if device == "cuda" and precision in ("bf16", "bf16-pure"):
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"--precision = {precision!r} but {torch.cuda.get_device_name()} has no bf16; "
                              "use --precision fp16 (or fp32)")
    return precision


def _in(where: str, precision: str) -> str:
    return where if precision == "fp32" else f"{where}, {precision}"


def _state_bytes(precision: str) -> dict[str, float]:
    """Gradients and optimizer state per parameter byte, as the runtime keeps them in `precision`:
    gradients in the weights' dtype; AdamW's fp32 moments (2), or with bf16 weights also the fp32
    master (`_PURE_OPTIMIZER_BYTES`)."""
    optimizer = _PURE_OPTIMIZER_BYTES if precision == "bf16-pure" else 2.0
    return {"gradient_bytes_per_parameter_byte": 1.0, "optimizer_bytes_per_parameter_byte": optimizer}


def _layer_parameters(layers: Any) -> list[list[tuple[Any, bool]]]:
    """Per layer, each parameter that takes a gradient and whether it takes no weight decay, as
    `pipefold train`'s parameter groups see it (`pipefold.job.optim.no_decay`). A spec is built on
    the meta device: shapes without memory. The parameters themselves, so their ids stay unique
    while the caller holds them (a module freed early could hand its ids on)."""
    from pipefold.job.optim import no_decay
    from pipefold.model.spec import LayerSpec

    found = []
    for layer in layers:
        module = layer.build("meta") if isinstance(layer, LayerSpec) else layer
        exempt = no_decay([module])
        found.append([(param, id(param) in exempt) for param in module.parameters() if param.requires_grad])
    return found


def _update_fields(layers: Any, device: str, precision: str) -> dict[str, Any]:
    """The update's temporaries (`ModelCosts.update_bytes_per_parameter_byte` and the three beside it)
    as `pipefold train` will allocate them on `device`: torch's AdamW takes its foreach path where
    every parameter is on CUDA and the single-tensor one on CPU, group by group
    (`pipefold.plan.update_memory`). The parameters in the order a rank visits them, a tied one once."""
    from pipefold.model.spec import TiedLayerSpec

    seen: set[int] = set()
    keys: set[str] = set()
    numels: list[int] = []
    exempt: list[bool] = []
    for layer, params in zip(layers, _layer_parameters(layers), strict=True):
        if isinstance(layer, TiedLayerSpec):
            if layer.key in keys:  # one tensor for all its occurrences
                continue
            keys.add(layer.key)
        for param, free in params:
            if id(param) not in seen:
                seen.add(id(param))
                numels.append(param.numel())
                exempt.append(free)
    pure = precision == "bf16-pure"
    return update_temporaries(numels, value_bytes=2 if pure else 4, foreach=device == "cuda", masters=pure,
                              no_decay=exempt)


def _with_update_split(costs: ModelCosts, layers: Any) -> ModelCosts:
    """`costs` with each layer's part of the update: `no_decay_parameter_bytes` (its measured
    parameter bytes times the share of its parameters' elements that take no weight decay,
    whatever their dtype) and `gradient_norm_bytes` (its tensors' float64 copies in order:
    `pipefold.plan.update_memory.layer_norm_bytes`)."""
    found = _layer_parameters(layers)
    shares = []
    for params in found:
        total = sum(param.numel() for param, _ in params)
        shares.append(sum(param.numel() for param, free in params if free) / total if total else 0.0)
    norms = layer_norm_bytes([[param.numel() for param, _ in params] for params in found])
    return replace(costs, layers=tuple(
        replace(layer, no_decay_parameter_bytes=round(layer.parameter_bytes * share),
                gradient_norm_bytes=norm)
        for layer, share, norm in zip(costs.layers, shares, norms, strict=True)))


def _device_and_threads(args: argparse.Namespace) -> tuple[str, int | None]:
    import torch

    device: str = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device = 'cuda' but torch sees no CUDA device here; use --device cpu")
    # One thread on CPU by default: `pipefold train` runs each rank with one (see
    # pipefold.runtime.processes.launch), and the planner should price the stages those ranks run.
    threads: int | None = args.threads if args.threads is not None else (1 if device == "cpu" else None)
    return device, threads


def _profile(layers: Any, ids: Any, device: str, threads: int | None, repeats: int,
             profile: Any) -> tuple[list[LayerProfile], str]:
    """`profile(layers, ids)` with `threads` torch threads; the profiles and the device in words."""
    import torch

    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        profiles: list[LayerProfile] = profile(layers, ids, device=device, num_repeats=repeats,
                                               split_backward=True)
    finally:
        torch.set_num_threads(previous_threads)
    if device == "cuda":
        where = f"cuda:{torch.cuda.current_device()} {torch.cuda.get_device_name()}"
    else:
        where = f"cpu, {threads or previous_threads} thread(s)"
    return profiles, where


def measure(args: argparse.Namespace, rows: int) -> GptProfile:
    """`measure_hf` where `args.model` names a Hugging Face model, else `measure_gpt`."""
    if getattr(args, "model", None) not in (None, "gpt"):
        return measure_hf(args, rows)
    return measure_gpt(args, rows)


def print_table(measured: GptProfile, console: Console) -> None:
    """Per layer F, B, I, W (ms), activation and parameter MiB, and the totals."""
    from rich.table import Table

    def ms(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds * 1e3:.3f}"

    def mib(num_bytes: int) -> str:
        return f"{num_bytes / 2**20:.3f}"

    table = Table(title=f"per-layer costs, micro-batch of {measured.rows} x {measured.seq_len} tokens "
                  f"({measured.device})")
    for column in ("#", "layer", "F ms", "B ms", "I ms", "W ms", "W share", "act MiB", "param MiB"):
        table.add_column(column, justify="left" if column == "layer" else "right", overflow="fold")
    for index, (name, layer, cost) in enumerate(
        zip(measured.names, measured.profiles, measured.costs.layers, strict=True)
    ):
        share = cost.weight_s / cost.backward_s if cost.backward_s > 0 else None
        table.add_row(
            str(index), name, ms(layer.forward_s), ms(layer.backward_s), ms(layer.input_grad_s),
            ms(layer.weight_grad_s), "-" if share is None else f"{share:.0%}", mib(layer.activation_bytes),
            mib(layer.parameter_bytes),
        )
    totals = _totals(measured.profiles)
    table.add_section()
    table.add_row(
        "", "total", ms(totals["F"]), ms(totals["B"]), ms(totals["I"]), ms(totals["W"]),
        f"{totals['W'] / (totals['I'] + totals['W']):.0%}" if totals["I"] + totals["W"] > 0 else "-",
        mib(sum(p.activation_bytes for p in measured.profiles)),
        mib(sum(p.parameter_bytes for p in measured.profiles)),
    )
    console.print(table)
    if totals["B"] > 0:
        console.print(
            f"I + W = {(totals['I'] + totals['W']) / totals['B']:.2f} x B: the split's own cost. The planner "
            "keeps each layer's B and splits it by the layer's W share.",
            highlight=False, markup=False, soft_wrap=True,
        )
    casts = sum(p.held_cast_bytes for p in measured.profiles)
    if casts:
        console.print(
            f"16-bit weight copies autocast holds for a step: {mib(casts)} MiB (once per rank, not per "
            "micro-batch; not in act MiB), made in "
            f"{sum(p.cast_s for p in measured.profiles) * 1e3:.2f} ms at a step's first forwards (not in F)",
            highlight=False, markup=False, soft_wrap=True,
        )
    console.print(f"costs: {measured.costs.source}", highlight=False, markup=False, soft_wrap=True)


def _totals(profiles: Sequence[LayerProfile]) -> dict[str, float]:
    return {
        "F": sum(p.forward_s for p in profiles),
        "B": sum(p.backward_s for p in profiles),
        "I": sum(p.input_grad_s or 0.0 for p in profiles),
        "W": sum(p.weight_grad_s or 0.0 for p in profiles),
    }


def write_costs(costs: ModelCosts, path: str, *, flag: str = "--out") -> None:
    try:
        Path(path).write_text(json.dumps(costs.to_json(), indent=1) + "\n")
    except OSError as error:
        raise ConfigError(f"{flag} {path!r}: cannot write the costs file: {error}") from None


def run(args: argparse.Namespace) -> int:
    if args.hardware is not None:
        device, threads = _device_and_threads(args)
        hardware = measure_hardware(args, device, threads)
        write_hardware(hardware, args.hardware)
        for line in summary(hardware, args.hardware):
            print(line)
        if not (args.out or args.json):
            return 0
    measured = measure(args, profile_rows(args))
    if args.out:
        write_costs(measured.costs, args.out)
    if args.json:
        print(json.dumps(measured.costs.to_json()))
        return 0
    from rich.console import Console

    console = Console()
    print_table(measured, console)
    if args.out:
        console.print(
            f"wrote {args.out}; plan with: pipefold plan --costs {args.out} --batch-size {args.batch_size} "
            "--ranks 2" + (f" (pipefold plan --model {args.model} --measure measures and plans in one)"
                           if args.model else ""),
            highlight=False, markup=False, soft_wrap=True,
        )
    return 0
