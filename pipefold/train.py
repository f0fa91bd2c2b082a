"""The main job as a library function: train the built-in GPT on the stdlib corpus.

`train(config)` runs on EVERY rank (one process per pipeline rank, already in a
process group: `pipefold train` spawns them, or start them with torchrun). Each
step draws the same seeded batch on every rank, runs one pipeline call and, for
flush schedules, one AdamW update. Rank 0 reports progress and, at the end,
writes into `config.out`:

    timeline.png     the last step's measured timeline, under the simulator's prediction
    trace.json       the same measured timeline as a Chrome/Perfetto trace
    summary.json     config, loss per step, throughput, bubble, predicted vs measured step time,
                     validation loss and a text sample

The prediction uses costs measured on this run (median F/B/I/W/STEP time per stage
over the last 10 steps), so the gap between the two is communication and overhead.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipefold.config import TrainConfig
from pipefold.data import VOCAB_SIZE, BatchSampler, decode, encode, load_corpus
from pipefold.errors import ConfigError, PipelineError
from pipefold.model.zoo import GPT, generate, gpt_layers, gpt_loss
from pipefold.runtime.launch import LaunchResult, init_process_group_from_env, spawn
from pipefold.schedule import Op, Schedule, WeightUpdate
from pipefold.simulate import CostModel, simulate
from pipefold.timeline import Timeline

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "StepRecord",
    "TrainResult",
    "train",
    "train_worker",
    "run_local",
    "resolve_out_dir",
    "measured_costs",
]

logger = logging.getLogger(__name__)

_SAMPLE_PROMPT = "def "
_NUM_VAL_BATCHES = 4
_NUM_COST_STEPS = 10
"""The prediction uses the stage costs measured over this many final steps."""


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    seconds: float
    tokens_per_s: float
    bubble_fraction: float


@dataclass
class TrainResult:
    """What rank 0 learned; other ranks get the same `steps` and no files."""

    steps: list[StepRecord]
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    sample: str = ""


def resolve_out_dir(config: TrainConfig) -> TrainConfig:
    """Fix `out` before any worker starts, so every rank agrees (default runs/<timestamp>)."""
    if config.out:
        return config
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = Path("runs") / stamp
    suffix = 1
    while candidate.exists():
        candidate = Path("runs") / f"{stamp}-{suffix}"
        suffix += 1
    return replace(config, out=str(candidate))


def _device(config: TrainConfig) -> torch.device | None:
    if config.device == "auto":
        return None
    if config.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError('device="cuda" but CUDA is not available here; use device="auto" or "cpu"')
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def measured_costs(timelines: Sequence[Timeline], schedule: Schedule) -> CostModel:
    """Per-stage median duration of each op over `timelines`, as a CostModel for `simulate`.

    The median, because on a shared machine a few actions stall for reasons the
    schedule does not cause. A schedule that only runs B has no separate I and W
    times; they are set to half of B each, which the simulator never uses for it.
    """
    durations: dict[tuple[Op, int], list[float]] = {}
    for timeline in timelines:
        for row in timeline.events:
            for event in row:
                durations.setdefault((event.action.op, event.action.stage), []).append(event.duration)

    def median(op: Op, stage: int) -> float:
        values = durations.get((op, stage), [])
        return statistics.median(values) if values else 0.0

    stages = range(schedule.num_stages)
    f = [median(Op.F, s) for s in stages]
    b = [median(Op.B, s) for s in stages]
    i = [median(Op.I, s) for s in stages]
    w = [median(Op.W, s) for s in stages]
    if not any(i) and not any(w):
        i = [value / 2 for value in b]
        w = [value / 2 for value in b]
    if not any(b):
        b = [x + y for x, y in zip(i, w, strict=True)]
    step = [median(Op.STEP, s) for s in stages]
    return CostModel.from_lists(f, i, w, b=b, step=step)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _lr_factor(warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0

    return factor


def _gather_state_dict(local: dict[str, Tensor]) -> dict[str, Tensor] | None:
    """All ranks' parameters on rank 0 (a tied weight arrives from each owner; they are equal)."""
    cpu = {name: tensor.detach().cpu() for name, tensor in local.items()}
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


@contextmanager
def _progress(console: Console | None, total: int) -> Iterator[Callable[[StepRecord], None]]:
    if console is None:
        yield lambda record: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TextColumn("bubble {task.fields[bubble]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=total, loss="-", speed="-", bubble="-")

        def update(record: StepRecord) -> None:
            progress.update(
                task,
                advance=1,
                loss=f"{record.loss:.3f}",
                speed=f"{record.tokens_per_s:,.0f}",
                bubble=f"{record.bubble_fraction:.0%}",
            )

        yield update


def train(config: TrainConfig, *, console: Console | None = None) -> TrainResult:
    """Run the job on this rank; call on every rank of an initialized process group.

    `console` is used on rank 0 only (progress bar and final report); None is silent.
    """
    from pipefold.runtime import Pipeline

    init_process_group_from_env(timeout_s=config.timeout_s)
    rank = dist.get_rank()
    world_size = dist.get_world_size()
    if world_size != config.schedule.ranks:
        raise ConfigError(
            f"schedule.ranks={config.schedule.ranks} but {world_size} processes were started; "
            f"launch {config.schedule.ranks} processes or set schedule.ranks={world_size}"
        )
    if not config.out:
        raise ConfigError("out is empty; call resolve_out_dir(config) before starting the ranks")
    report = console if rank == 0 else None
    torch.manual_seed(config.seed)

    corpus = load_corpus(config.data.max_bytes, config.data.val_fraction)
    m = config.model
    layers = gpt_layers(
        VOCAB_SIZE, m.d_model, m.num_heads, m.num_layers, m.seq_len, tie_embeddings=m.tie_embeddings
    )
    is_flush = _weight_update(config) is WeightUpdate.FLUSH
    opt = config.optimizer

    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            params, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay
        )

    recompute: str | Sequence[int] = config.recompute
    pipe = Pipeline(
        layers,
        loss_fn=gpt_loss,
        schedule=config.schedule.name,
        num_microbatches=config.schedule.microbatches,
        num_virtual=config.schedule.num_virtual,
        partition=list(config.partition) if isinstance(config.partition, tuple) else config.partition,
        recompute=list(recompute) if isinstance(recompute, tuple) else recompute,
        device=_device(config),
        optimizer=None if is_flush else make_optimizer,
        seed=config.seed,
        timeout_s=config.timeout_s,
    )
    optimizer = make_optimizer(list(pipe.parameters())) if is_flush else None
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(opt.warmup_steps)) if optimizer else None
    )
    sampler = BatchSampler(corpus.train, batch_size=config.batch_size, seq_len=m.seq_len, seed=config.seed)
    tokens_per_step = config.batch_size * m.seq_len
    if report is not None:
        num_parameters = sum(p.numel() for p in GPT(layers, "meta").parameters())
        report.print(
            f"pipefold train: GPT {num_parameters / 1e6:.2f}M parameters, {len(layers)} layers, "
            f"partition {pipe.partition}, schedule {config.schedule.name} on {world_size} ranks, "
            f"{config.schedule.microbatches} micro-batches, corpus {corpus.num_bytes / 1e6:.1f} MB "
            f"({corpus.num_files} stdlib files)"
        )

    records: list[StepRecord] = []
    recent: collections.deque[Timeline] = collections.deque(maxlen=_NUM_COST_STEPS)
    with _progress(report, config.steps) as update:
        for step in range(config.steps):
            inputs, targets = sampler.next_batch()
            started = time.perf_counter()
            loss = pipe.step(inputs, targets)
            if optimizer is not None and scheduler is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            seconds = time.perf_counter() - started
            timeline = _last_timeline(pipe.last_timeline)
            recent.append(timeline)
            record = StepRecord(
                step, float(loss), seconds, tokens_per_step / seconds, timeline.bubble_fraction
            )
            records.append(record)
            update(record)

    state = _gather_state_dict(dict(pipe.state_dict()))
    result = TrainResult(steps=records)
    if rank != 0 or state is None:
        return result
    return _finish(
        config, layers, state, pipe.schedule, list(recent), str(pipe.partition), corpus.val, records, report
    )


def _last_timeline(timeline: Timeline | None) -> Timeline:
    if timeline is None:
        # Pipeline records a timeline after every step unless built with record_timeline=False.
        raise PipelineError(
            "the pipeline recorded no timeline for the last step; build it with record_timeline=True"
        )
    return timeline


def _weight_update(config: TrainConfig) -> WeightUpdate:
    from pipefold.schedule import build

    s = config.schedule
    schedule = build(s.name, num_ranks=s.ranks, num_microbatches=s.microbatches, num_virtual=s.num_virtual)
    return schedule.weight_update


@torch.no_grad()
def _validation_loss(model: GPT, val: bytes, config: TrainConfig) -> float:
    seq_len = min(config.model.seq_len, len(val) - 1)
    sampler = BatchSampler(val, batch_size=config.batch_size, seq_len=seq_len, seed=config.seed + 1)
    batches = [sampler.next_batch() for _ in range(_NUM_VAL_BATCHES)]
    losses = [gpt_loss(model(inputs), targets).item() for inputs, targets in batches]
    return statistics.fmean(losses)


def _finish(
    config: TrainConfig,
    layers: Sequence[Any],
    state: dict[str, Tensor],
    schedule: Schedule,
    recent: Sequence[Timeline],
    partition: str,
    val: bytes,
    records: list[StepRecord],
    report: Console | None,
) -> TrainResult:
    from pipefold.viz import save_chrome_trace, save_png

    out = Path(config.out)
    model = GPT.from_layers(layers, state)
    val_loss = _validation_loss(model, val, config)
    sample = ""
    if config.sample_tokens:
        generator = torch.Generator().manual_seed(config.seed)
        prompt = torch.tensor(list(encode(_SAMPLE_PROMPT)), dtype=torch.long)
        ids = generate(model, prompt, config.sample_tokens, temperature=0.8, generator=generator)
        sample = decode(ids.tolist())

    timeline = recent[-1]
    predicted = simulate(schedule, measured_costs(recent, schedule))
    save_png(timeline, out / "timeline.png", compare=predicted)
    save_chrome_trace(timeline, out / "trace.json")

    # The first steps pay for allocation and warm-up; the median of the rest is the steady state.
    steady = [r.seconds for r in records[1:]] or [records[0].seconds]
    step_seconds = statistics.median(steady)
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "partition": partition,
        "losses": [r.loss for r in records],
        "step_seconds": [r.seconds for r in records],
        "bubble_fraction": [r.bubble_fraction for r in records],
        "first_loss": records[0].loss,
        "final_loss": records[-1].loss,
        "val_loss": val_loss,
        "val_loss_uniform": math.log(VOCAB_SIZE),
        "tokens_per_s": config.batch_size * config.model.seq_len / step_seconds,
        "step_time": {
            "measured_wall_median": step_seconds,
            "measured_makespan_last": timeline.makespan,
            "predicted_makespan": predicted.makespan,
            "predicted_bubble_fraction": predicted.bubble_fraction,
            "measured_bubble_fraction_last": timeline.bubble_fraction,
        },
        "measured_timeline": timeline.summary(),
        "sample_prompt": _SAMPLE_PROMPT,
        "sample": sample,
        "torch": torch.__version__,
    }
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if report is not None:
        report.print(
            f"loss {records[0].loss:.3f} -> {records[-1].loss:.3f} (validation {val_loss:.3f}); "
            f"{summary['tokens_per_s']:,.0f} tokens/s; step {step_seconds * 1e3:.0f} ms measured, "
            f"{predicted.makespan * 1e3:.0f} ms predicted from measured stage costs; "
            f"bubble {timeline.bubble_fraction:.0%} measured, {predicted.bubble_fraction:.0%} predicted"
        )
        if sample:
            report.rule("sample")
            report.print(sample, markup=False, highlight=False)
            report.rule()
        report.print(f"wrote {out / 'timeline.png'}, {out / 'trace.json'}, {out / 'summary.json'}")
    return TrainResult(steps=records, summary=summary, out_dir=out, sample=sample)


def train_worker(config: TrainConfig, show: bool = True) -> None:
    """Entry point of one spawned rank: rank 0 reports to the terminal when `show`."""
    from rich.console import Console

    try:
        train(config, console=Console() if show else None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(config: TrainConfig, *, show: bool = True) -> LaunchResult:
    """Spawn `config.schedule.ranks` local workers running `train_worker`."""
    return spawn(train_worker, config.schedule.ranks, (config, show))
