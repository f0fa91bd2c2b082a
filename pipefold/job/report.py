"""What the training job tells: the progress bar, the opening line, and at the end (rank 0)
the memory report, the validation loss, a text sample and the files in `config.out`:

    timeline.png     the last step's measured timeline, under the simulator's prediction
    trace.json       the same measured timeline as a Chrome/Perfetto trace
    summary.json     config, loss per step, throughput, bubble, predicted vs measured step time,
                     memory per rank, re-tuning decisions, validation loss and a text sample
    costs.json       the per-stage F/B/I/W times this run measured (a CostModel): feed it to
                     `pipefold schedules find --costs-file` and run the result with --schedule-file

The prediction uses the costs measured over the run's last steps (`measured_cost_model`), so
the gap between prediction and measurement is what neither captures.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from pipefold.data import VOCAB_SIZE, BatchSampler, decode, encode
from pipefold.files import write_atomic
from pipefold.job.config import CHECKPOINT_DIR, HF_DIR, TrainConfig
from pipefold.job.setup import Job
from pipefold.model.zoo import GPT, generate, gpt_loss
from pipefold.plan.units import format_bytes
from pipefold.runtime import Pipeline
from pipefold.runtime.measured import measured_cost_model
from pipefold.runtime.parallel.tensor_parallel import local, whole
from pipefold.runtime.parallel.zero import is_sharded_optimizer
from pipefold.schedule import Schedule
from pipefold.simulate import simulate
from pipefold.timeline import Timeline
from pipefold.viz import render_png, to_chrome_trace

__all__ = [
    "Gathered",
    "StepStats",
    "TrainResult",
    "describe",
    "finish",
    "gather",
    "progress",
    "validation_batches",
]

SAMPLE_PROMPT = "def "
_NUM_VAL_BATCHES = 4


@dataclass(frozen=True)
class StepStats:
    """One training step as the job measured it: loss, wall time, throughput and bubble."""

    step: int
    loss: float
    seconds: float
    tokens_per_s: float
    bubble_fraction: float
    grad_norm: float | None = None
    """The global gradient norm before clipping; None where the schedule updates inside the step."""
    lr: float | None = None
    """The learning rate this step's update used (the first param group's)."""
    eval_loss: float | None = None
    """The validation loss through the pipeline after this step, where one was due (eval_every)."""
    loss_scale: float | None = None
    """fp16: the loss scale this step ran with (None in fp32 and bf16)."""
    skipped: bool = False
    """fp16: the step overflowed on some rank, and every rank skipped its update."""
    mfu: float | None = None
    """Model FLOPs utilization of the step (config.hardware given); None otherwise."""
    seq_len: int | None = None
    """data.bucket_by_length: the step's sequence length (the longest of its accumulated
    batches); None where every step has model.seq_len."""
    activation_bytes_peak: tuple[int, ...] = ()
    """Per pipeline rank, the most bytes of saved activations it held during the step (the
    runtime's count, gathered with the step's timeline: no extra communication)."""
    cpu_seconds: float | None = None
    """The CPU time this rank's process used in the step (`time.process_time`): with the wall
    `seconds`, the share of a core the rank got, which other load on the host lowers."""


@dataclass
class TrainResult:
    """What rank 0 learned; other ranks get the same `steps` and no files."""

    steps: list[StepStats]
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    sample: str = ""


def describe(job: Job) -> str:
    """The opening line: the model, the partition, the schedule and the parallel layout."""
    config, pipe, s = job.config, job.pipe, job.config.schedule
    if job.hf is not None and job.tokens is not None:
        num_parameters = sum(p.numel() for p in job.hf.model.parameters())
        model = f"{type(job.hf.model).__name__} ({config.model.path})"
        data = f"{job.tokens.num_tokens:,} tokens from {job.tokens.source}"
    else:
        assert job.corpus is not None
        num_parameters = sum(p.numel() for p in GPT(job.layers, "meta").parameters())
        model = "GPT"
        data = f"corpus {job.corpus.num_bytes / 1e6:.1f} MB ({job.corpus.num_files} stdlib files)"
    return (
        f"pipefold train: {model} {num_parameters / 1e6:.2f}M parameters, {len(job.layers)} layers, "
        f"partition {pipe.partition}, schedule {config.schedule_label} on {s.ranks} ranks"
        f"{f' x {pipe.num_data_parallel} data-parallel replicas' if pipe.num_data_parallel > 1 else ''}"
        f"{f' x {s.tensor_parallel} tensor-parallel' if s.tensor_parallel > 1 else ''}"
        f"{' (sequence-parallel)' if s.sequence_parallel else ''} "
        f"({job.device.type}, {config.compute_precision}"
        f"{' from auto' if config.precision == 'auto' else ''}), {s.num_microbatches} micro-batches, {data}"
    )


@contextmanager
def progress(console: Console | None, total: int) -> Iterator[Callable[[StepStats], None]]:
    """A progress bar on `console` (None: silent); yields the function to call after each step."""
    if console is None:
        yield lambda record: None
        return
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TextColumn("bubble {task.fields[bubble]}"),
        TextColumn("|g| {task.fields[grad_norm]}"),
        TextColumn("val {task.fields[val]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=total, loss="-", speed="-", bubble="-", grad_norm="-", val="-")
        last_val = ["-"]

        def update(record: StepStats) -> None:
            if record.eval_loss is not None:
                last_val[0] = f"{record.eval_loss:.3f} (ppl {math.exp(min(record.eval_loss, 50.0)):.1f})"
            bar.update(
                task,
                advance=1,
                loss=f"{record.loss:.3f}",
                speed=f"{record.tokens_per_s:,.0f}",
                bubble=f"{record.bubble_fraction:.0%}",
                grad_norm="-" if record.grad_norm is None else f"{record.grad_norm:.3g}",
                val=last_val[0],
            )

        yield update


@dataclass
class Gathered:
    """What rank 0 collects from every rank after the last step (None elsewhere)."""

    state: dict[str, Tensor] | None
    memory: list[dict[str, int]] | None


def gather(job: Job, last: Timeline | None, allocator: Mapping[str, int] | None = None) -> Gathered:
    """Every rank calls it: the whole model's parameters and every rank's memory, on rank 0
    (`allocator`: this rank's allocator peaks, pipefold.job.allocator_peaks: CUDA's, or a profiled
    CPU rank's; else empty)."""
    memory = _gather_memory(job.pipe, job.optimizers, last, allocator)
    state = _gather_state_dict(dict(job.pipe.state_dict()))
    return Gathered(state, memory)


def finish(
    job: Job,
    state: dict[str, Tensor],
    recent: Sequence[Timeline],
    records: list[StepStats],
    console: Console | None,
    memory: list[dict[str, int]] | None = None,
    retunes: list[dict[str, Any]] | None = None,
    stream: tuple[Schedule, float] | None = None,
) -> TrainResult:
    """Rank 0: validate and sample the trained model, predict the step from the measured costs,
    write the files into `config.out` and print the final report on `console`."""
    config, pipe = job.config, job.pipe
    out = Path(config.out)
    if job.hf is not None:
        val_loss, sample, vocab_size = _hf_validation(job)
    else:
        assert job.corpus is not None
        vocab_size = VOCAB_SIZE
        model = GPT.from_layers(job.layers, state).eval()  # no dropout in the validation loss
        val_loss = _validation_loss(model, job.corpus.val, config)
        sample = ""
        if config.sample_tokens:
            generator = torch.Generator().manual_seed(config.seed)
            prompt = torch.tensor(list(encode(SAMPLE_PROMPT)), dtype=torch.long)
            ids = generate(model, prompt, config.sample_tokens, temperature=0.8, generator=generator)
            sample = decode(ids.tolist())

    timeline = recent[-1]
    # The wall times of the same steps give the time outside the actions (the step's
    # exchanges and the optimizer update) as the cost model's step_overhead.
    walls = [r.seconds for r in records[-len(recent) :]]
    measured_schedule = pipe.running_schedule
    if stream is not None:  # a streaming run: the last stream (its schedule and wall time) as one step
        measured_schedule, walls, recent = stream[0], [stream[1]], recent[-1:]
    costs = measured_cost_model(recent, measured_schedule, step_times=walls)
    predicted = simulate(measured_schedule, costs)
    predicted_step = predicted.makespan + costs.step_overhead
    # The stage costs this run measured, as `pipefold schedules find --costs-file` takes them.
    write_atomic(out / "costs.json", json.dumps(costs.to_json(), indent=1) + "\n")
    write_atomic(out / "timeline.png", render_png(timeline, compare=predicted))
    write_atomic(out / "trace.json", json.dumps(to_chrome_trace(timeline)))

    # The first steps pay for allocation and warm-up; the median of the rest is the steady state.
    steady_records = records[1:] or records[:1]
    steady = [r.seconds for r in steady_records]
    step_seconds = statistics.median(steady)
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "precision": config.compute_precision,  # "auto" resolved
        "partition": str(pipe.partition),
        "start_step": records[0].step,
        "checkpoint": str(out / CHECKPOINT_DIR),
        "losses": [r.loss for r in records],
        "step_seconds": [r.seconds for r in records],
        # Rank 0's CPU seconds per step: wall x the core share it got (benchmarks/planner.py).
        "step_cpu_seconds": [r.cpu_seconds for r in records],
        "bubble_fraction": [r.bubble_fraction for r in records],
        # The global gradient norm before clipping and the lr of each step's update (None where
        # an asynchronous schedule updates inside the step).
        "grad_norms": [r.grad_norm for r in records],
        "lrs": [r.lr for r in records],
        "tokens_per_s_steps": [r.tokens_per_s for r in records],
        # data.bucket_by_length: each step's sequence length (else every step has model.seq_len).
        "seq_len_steps": [r.seq_len for r in records] if config.data.bucket_by_length else None,
        # fp16: the loss scale of each step and the steps skipped on an overflow.
        "loss_scales": [r.loss_scale for r in records],
        "skipped_steps": [r.step + 1 for r in records if r.skipped],
        # Validation through the pipeline (eval_every): after which step, the loss, its perplexity.
        "evals": [
            {"step": r.step + 1, "loss": r.eval_loss, "perplexity": math.exp(min(r.eval_loss, 50.0))}
            for r in records
            if r.eval_loss is not None
        ],
        "first_loss": records[0].loss,
        "final_loss": records[-1].loss,
        "val_loss": val_loss,
        "val_loss_uniform": math.log(vocab_size),
        # Steps of different lengths (data.bucket_by_length) take different times: tokens over time.
        "tokens_per_s": sum(r.tokens_per_s * r.seconds for r in steady_records)
        / sum(r.seconds for r in steady_records),
        # schedule.streaming: the steps of the last stream, whose timeline and prediction
        # "step_time" then describes (one call of that many steps), else None.
        "stream_steps_last": (
            None if stream is None else stream[0].num_microbatches // pipe.schedule.num_microbatches
        ),
        "step_time": {
            "measured_wall_median": step_seconds,
            # The steps the costs were measured in: the like-for-like check of the prediction
            # (a host that drifts during a long run moves the whole-run median).
            "measured_wall_median_recent": statistics.median(walls),
            "num_recent_steps": len(walls),
            "measured_makespan_last": timeline.makespan,
            "predicted_makespan": predicted.makespan,
            "predicted_wall": predicted_step,
            "predicted_action_overhead": costs.action_overhead,
            "predicted_step_overhead": costs.step_overhead,
            "predicted_bubble_fraction": predicted.bubble_fraction,
            "measured_bubble_fraction_last": timeline.bubble_fraction,
        },
        "measured_timeline": timeline.summary(),
        # Per world rank: its weights and optimizer state after the last step, and its
        # counted activation peak; on CUDA its allocator's peaks over the kept steps (cuda_*).
        "memory": memory or [],
        # Where schedule.retune_every switched the order (pipefold/job/retune.py): the step, what
        # ran before and after, both predictions, both measurements, and whether it was kept.
        "retunes": retunes or [],
        # schedule.adaptive: per (rows, length bucket) the choice it ran last, its prediction, the
        # measured medians of the choices tried and the runner-up (pipefold/plan/adaptive.py).
        "adaptive": job.adaptive.chooser.report() if job.adaptive is not None else None,
        "sample_prompt": SAMPLE_PROMPT,
        "sample": sample,
        "torch": torch.__version__,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if console is not None:
        console.print(
            f"loss {records[0].loss:.3f} -> {records[-1].loss:.3f} (validation {val_loss:.3f}); "
            f"{summary['tokens_per_s']:,.0f} tokens/s; step {step_seconds * 1e3:.0f} ms (median); last "
            + (f"{len(walls)} steps" if stream is None else f"stream of {summary['stream_steps_last']} steps")
            + f" {statistics.median(walls) * 1e3:.0f} ms measured, "
            f"{predicted_step * 1e3:.0f} ms predicted from their stage costs and overheads; "
            f"bubble {timeline.bubble_fraction:.0%} measured, {predicted.bubble_fraction:.0%} predicted"
        )
        if memory:
            console.print(_memory_line(memory))
            allocator_line = _allocator_line(memory)
            if allocator_line is not None:
                console.print(allocator_line)
        for row in summary["adaptive"] or []:
            console.print(_adaptive_line(row))
        if sample:
            console.rule("sample")
            console.print(sample, markup=False, highlight=False)
            console.rule()
        console.print(
            f"wrote {out / 'timeline.png'}, {out / 'trace.json'}, {out / 'summary.json'}, "
            f"{out / 'costs.json'}, "
            f"{out / CHECKPOINT_DIR}/"
            + (f", {out / HF_DIR}/ (Hugging Face format)" if job.hf is not None else "")
        )
    return TrainResult(steps=records, summary=summary, out_dir=out, sample=sample)


def _adaptive_line(row: dict[str, Any]) -> str:
    times = row["trial_s"] if row["settled"] else row["measured_s"]
    measured = ", ".join(f"{label} {seconds * 1e3:.0f} ms" for label, seconds in times.items())
    measured = f"re-check {measured}" if row["settled"] else f"{measured} (re-check not finished)"
    return (
        f"adaptive: length <= {row['bucket']}, {row['rows']} rows ({row['steps']} steps) -> {row['choice']}, "
        f"predicted {row['predicted_step_s'] * 1e3:.0f} ms, {format_bytes(row['peak_memory'])} per rank; "
        f"measured {measured}"
    )


@torch.no_grad()
def _hf_validation(job: Job) -> tuple[float, str, int]:
    """Rank 0: the validation loss and a sample of the model saved into <out>/hf, loaded back
    with transformers' own `from_pretrained` (so every run checks the saved files)."""
    from pipefold.hf.model import load_pretrained, next_token_loss

    config = job.config
    assert job.tokens is not None and job.hf is not None
    model, tokenizer = load_pretrained(Path(config.out) / HF_DIR)
    seq_len = min(config.model.seq_len, int(job.tokens.val.shape[0]) - 1)
    sampler = BatchSampler(
        job.tokens.val, batch_size=config.batch_size, seq_len=seq_len, seed=config.seed + 1
    )
    batches = [sampler.next_batch() for _ in range(_NUM_VAL_BATCHES)]
    losses = [next_token_loss(model(inputs).logits, targets).item() for inputs, targets in batches]
    sample = ""
    if config.sample_tokens and tokenizer is not None:
        generator = torch.Generator().manual_seed(config.seed)
        ids = torch.tensor([tokenizer.encode(SAMPLE_PROMPT).ids], dtype=torch.long)
        for _ in range(config.sample_tokens):
            logits = model(ids[:, -config.model.seq_len :]).logits[:, -1, :]
            next_id = torch.multinomial(torch.softmax(logits / 0.8, dim=-1), 1, generator=generator)
            ids = torch.cat([ids, next_id], dim=1)
        sample = tokenizer.decode(ids[0].tolist())
    return statistics.fmean(losses), sample, job.hf.files.vocab_size


def validation_batches(
    config: TrainConfig, val: bytes | np.ndarray, num_batches: int | None = None
) -> list[tuple[Tensor, Tensor]]:
    """The held-out batches every evaluation uses (the same on every rank and every time):
    `num_batches` (default config.eval_batches) of batch_size sequences from the val split."""
    seq_len = min(config.model.seq_len, len(val) - 1)
    sampler = BatchSampler(val, batch_size=config.batch_size, seq_len=seq_len, seed=config.seed + 1)
    return [sampler.next_batch() for _ in range(config.eval_batches if num_batches is None else num_batches)]


@torch.no_grad()
def _validation_loss(model: GPT, val: bytes, config: TrainConfig) -> float:
    batches = validation_batches(config, val, _NUM_VAL_BATCHES)
    losses = [gpt_loss(model(inputs), targets).item() for inputs, targets in batches]
    return statistics.fmean(losses)


def _gather_state_dict(local_state: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """All ranks' parameters on rank 0 (a tied weight arrives from each owner; they are equal).
    Tensor-parallel shards are gathered whole first (every tp rank calls this)."""
    cpu = {name: whole(tensor.detach()).cpu() for name, tensor in local_state.items()}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return cpu
    parts: list[dict[str, Tensor]] | None = None
    if dist.get_rank() == 0:
        parts = [{} for _ in range(dist.get_world_size())]
    dist.gather_object(cpu, parts, dst=0)
    if parts is None:
        return None
    merged: dict[str, Tensor] = {}
    for part in parts:
        merged.update(part)
    return merged


def _memory_line(memory: Sequence[Mapping[str, int]]) -> str:
    """'memory per rank (MiB), replica 0: weights 1.2 / 1.1, Adam state 2.4 / 2.2, activations ...'."""
    ranks = sorted((entry for entry in memory if entry["replica"] == 0), key=lambda e: e["world_rank"])

    def column(key: str) -> str:
        return " / ".join(f"{entry[key] / 2**20:.2f}" for entry in ranks)

    return (
        f"memory per rank (MiB), replica 0: weights {column('weights')}, optimizer state "
        f"{column('optimizer')}, activations at peak {column('activations_peak')}"
    )


def _allocator_line(memory: Sequence[Mapping[str, int]]) -> str | None:
    """On CUDA, 'CUDA allocator per rank (MiB), replica 0, 2 kept steps: peak allocated 958.1 /
    ...'; on CPU with memory_peaks, 'CPU allocations per rank (MiB), ...' (no reserved peak);
    None where no rank reports its allocator."""
    device = "cuda" if any("cuda_allocated_peak" in entry for entry in memory) else "cpu"
    name = "CUDA allocator" if device == "cuda" else "CPU allocations"
    ranks = sorted((entry for entry in memory
                    if entry["replica"] == 0 and f"{device}_allocated_peak" in entry),
                   key=lambda e: e["world_rank"])
    if not ranks:
        return None

    def column(key: str) -> str:
        return " / ".join(f"{entry[f'{device}_{key}'] / 2**20:.1f}" for entry in ranks)

    num_kept = ranks[0][f"{device}_kept_steps"]
    reserved = f", peak reserved {column('reserved_peak')}" if device == "cuda" else ""
    return (
        f"{name} per rank (MiB), replica 0, {num_kept} kept step{'' if num_kept == 1 else 's'}: "
        f"peak allocated {column('allocated_peak')} (pipeline call {column('allocated_peak_pipeline')})"
        f"{reserved}; allocated before the first step {column('allocated_before_steps')}, between steps "
        f"{column('allocated_kept_start')}"
    )


def _local_bytes(tensor: Tensor) -> int:
    """Bytes this rank stores for `tensor` (a tensor-parallel shard's, not the whole's)."""
    held = local(tensor)
    return held.numel() * held.element_size()


def _optimizer_state(optimizer: torch.optim.Optimizer) -> Any:
    """The state this rank holds: a ZeRO-sharded optimizer's own share (`.optim`), else its state."""
    return optimizer.optim.state if is_sharded_optimizer(optimizer) else optimizer.state  # type: ignore[attr-defined]


def _gather_memory(
    pipe: Pipeline, optimizers: Sequence[torch.optim.Optimizer], timeline: Timeline | None,
    allocator: Mapping[str, int] | None = None,
) -> list[dict[str, int]] | None:
    """Per world rank (on rank 0; None elsewhere): the bytes it holds in weights and optimizer
    state (shards where tensor-parallel or ZeRO-sharded; gradients, during the step, are as
    large as the weights), its counted activation peak and the 16-bit weight copies it holds;
    on CUDA also its allocator's peaks (`allocator`, the keys of
    pipefold.job.allocator_peaks.CUDA_MEMORY_KEYS), on CPU with memory_peaks the profiler's
    (CPU_MEMORY_KEYS); absent otherwise."""
    params = list(pipe.parameters())
    peaks = tuple(getattr(timeline, "activation_bytes_peak", ()))
    mine = {
        "world_rank": dist.get_rank() if dist.is_initialized() else 0,
        "pipeline_rank": pipe.rank,
        "replica": pipe.data_parallel_rank,
        "weights": sum(_local_bytes(p) for p in params),
        "optimizer": sum(
            _local_bytes(value)
            for optimizer in optimizers
            for state in _optimizer_state(optimizer).values()
            for value in state.values()
            if isinstance(value, Tensor) and value.dim() > 0
        ),
        "activations_peak": int(peaks[pipe.rank]) if pipe.rank < len(peaks) else 0,
        # Mixed precision: autocast's weight copies the step holds once (runtime.held_copies).
        "casts": sum(stage.held_cast_bytes or 0 for stage in pipe.stages),
        **(allocator or {}),
    }
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    found: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, found, dst=0)
    return found
