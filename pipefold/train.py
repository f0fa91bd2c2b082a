"""The main job as a library function: train the built-in GPT on the stdlib corpus.

    pipefold train                          # 2 CPU ranks, 1F1B, 300 steps: loss ~5.3 -> ~2.1,
                                            # about 1.5 min on 2 idle cores
    pipefold train --schedule zb-h1 --ranks 4 --steps 50
    torchrun --nproc-per-node 4 -m pipefold train --ranks 4      # one node, GPUs if present

    from pipefold.config import load_config
    from pipefold.train import resolve_out_dir, run_local
    run_local(resolve_out_dir(load_config(overrides={"steps": 20})))

`train(config)` runs on EVERY rank (one process per pipeline rank, already in a
process group: `pipefold train` spawns them, or start them with torchrun). Each
step draws the same seeded batch on every rank, runs one pipeline call and, for
flush schedules, one AdamW update. Rank 0 reports progress and, at the end,
writes into `config.out`:

    timeline.png     the last step's measured timeline, under the simulator's prediction
    trace.json       the same measured timeline as a Chrome/Perfetto trace
    summary.json     config, loss per step, throughput, bubble, predicted vs measured step time,
                     validation loss and a text sample
    costs.json       the per-stage F/B/I/W times this run measured (a CostModel): feed it to
                     `pipefold schedules find --costs-file` and run the result with --schedule-file
    checkpoint/      weights and AdamW state of every rank (pipefold.runtime.checkpoint), saved at
                     the end and every `checkpoint_every` steps; `--resume <out>/checkpoint`
                     continues from it with the loss where it left off (same batches, same
                     optimizer state, same learning-rate schedule)

The prediction uses costs measured on this run over the last 10 steps: the mean
F/B/I/W/STEP time per stage without stalls and the median message latency between ranks
(`pipefold.runtime.measured_cost_model`), so the gap between the two is what neither
captures (per-step overhead, stalls, ranks slowing each other unevenly).
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from pipefold.retune import Retuner
from pipefold.runtime.measured import measured_cost_model
from pipefold.runtime.processes.launch import LaunchResult, init_process_group_from_env, spawn
from pipefold.schedule import Schedule, WeightUpdate
from pipefold.simulate import simulate
from pipefold.timeline import Timeline

if TYPE_CHECKING:
    from rich.console import Console

    from pipefold.runtime import Pipeline

__all__ = [
    "StepRecord",
    "TrainResult",
    "train",
    "train_worker",
    "run_local",
    "resolve_out_dir",
    "resolve_device",
    "check_resume",
    "CHECKPOINT_DIR",
]

logger = logging.getLogger(__name__)

_SAMPLE_PROMPT = "def "
_NUM_VAL_BATCHES = 4
_NUM_COST_STEPS = 10
"""The prediction uses the stage costs measured over this many final steps."""
CHECKPOINT_DIR = "checkpoint"
"""Where in `config.out` the job saves its checkpoint."""


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


def resolve_device(choice: str, local_rank: int) -> torch.device:
    """This rank's device for `config.device` ("auto", "cpu" or "cuda").

    "auto" takes cuda:<local rank> when this machine has a GPU for every local rank,
    else the CPU (with a warning when some GPUs exist but too few).
    """
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if local_rank >= num_gpus:
            raise ConfigError(
                f'device="cuda" but local rank {local_rank} has no GPU (this machine has {num_gpus}); '
                f'use at most {num_gpus} ranks per machine or device="cpu"'
            )
        return torch.device("cuda", local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    if num_gpus and local_world <= num_gpus:
        return torch.device("cuda", local_rank)
    if num_gpus:
        logger.warning("%d local ranks but %d GPUs: running on the CPU", local_world, num_gpus)
    return torch.device("cpu")


def check_resume(config: TrainConfig) -> int:
    """The step `config.resume` continues from (0 without one); refuses a bad checkpoint early.

    Reads only the checkpoint's JSON, so it runs before any worker starts.
    """
    if not config.resume:
        return 0
    from pipefold.runtime.checkpoint import read_checkpoint_info

    try:
        info = read_checkpoint_info(config.resume)
    except ConfigError as error:
        raise ConfigError(f"resume={config.resume!r}: {error}") from None
    if info.step is None or not info.has_optimizer:
        raise ConfigError(
            f"resume={config.resume!r} was not saved by `pipefold train` (it lacks the step counter or "
            "the optimizer state); give <out>/checkpoint of an earlier run"
        )
    if info.step >= config.steps:
        raise ConfigError(
            f"resume={config.resume!r} is at step {info.step} but steps={config.steps}; steps counts from "
            f"the start of the first run: use steps > {info.step} (e.g. --steps {info.step + config.steps})"
        )
    return info.step


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
    """All ranks' parameters on rank 0 (a tied weight arrives from each owner; they are equal).
    Tensor-parallel shards are gathered whole first (every tp rank calls this)."""
    from pipefold.runtime.parallel.tensor_parallel import whole  # deferred like Pipeline (_make_pipeline)

    cpu = {name: whole(tensor.detach()).cpu() for name, tensor in local.items()}
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


def _local_bytes(tensor: Tensor) -> int:
    """Bytes this rank stores for `tensor` (a tensor-parallel shard's, not the whole's)."""
    from pipefold.runtime.parallel.tensor_parallel import local  # deferred like Pipeline (_make_pipeline)

    held = local(tensor)
    return held.numel() * held.element_size()


def _optimizer_state(optimizer: torch.optim.Optimizer) -> Any:
    """The state this rank holds: a ZeRO-sharded optimizer's own share (`.optim`), else its state."""
    from pipefold.runtime.parallel.zero import is_sharded_optimizer  # deferred like Pipeline (_make_pipeline)

    return optimizer.optim.state if is_sharded_optimizer(optimizer) else optimizer.state  # type: ignore[attr-defined]


def _gather_memory(
    pipe: Pipeline, optimizers: Sequence[torch.optim.Optimizer], timeline: Timeline | None
) -> list[dict[str, int]] | None:
    """Per world rank (on rank 0; None elsewhere): the bytes it holds in weights and optimizer
    state (shards where tensor-parallel or ZeRO-sharded; gradients, during the step, are as
    large as the weights), and its counted activation peak."""
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
    }
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    found: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, found, dst=0)
    return found


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
    """Run the job on this rank; call it on every rank.

    Joins the process group from torchrun's variables unless already in one.
    `console` is used on rank 0 only (progress bar and final report); None is silent.
    """
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group_from_env(
        backend="nccl" if device.type == "cuda" else "gloo", timeout_s=config.timeout_s
    )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    s = config.schedule
    if world_size != s.num_processes:
        raise ConfigError(
            f"schedule.ranks={s.ranks} x schedule.data_parallel={s.data_parallel} x "
            f"schedule.tensor_parallel={s.tensor_parallel} needs {s.num_processes} processes but "
            f"{world_size} were started; launch {s.num_processes} processes or change schedule.ranks / "
            "schedule.data_parallel / schedule.tensor_parallel to match"
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
    sampler = BatchSampler(corpus.train, batch_size=config.batch_size, seq_len=m.seq_len, seed=config.seed)
    pipe, optimizer, searched = _make_pipeline(config, layers, sampler, device)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config.optimizer.warmup_steps))
        if optimizer is not None
        else None
    )
    from pipefold.runtime.checkpoint import save_checkpoint  # deferred like Pipeline (_make_pipeline)

    optimizers = _optimizers_of(pipe, optimizer)
    start_step = _resume(config, pipe, optimizers, scheduler, sampler, report)
    if report is not None:
        num_parameters = sum(p.numel() for p in GPT(layers, "meta").parameters())
        report.print(
            f"pipefold train: GPT {num_parameters / 1e6:.2f}M parameters, {len(layers)} layers, "
            f"partition {pipe.partition}, schedule {config.schedule_label} on {config.schedule.ranks} ranks"
            f"{f' x {pipe.num_data_parallel} data-parallel replicas' if pipe.num_data_parallel > 1 else ''}"
            f"{f' x {s.tensor_parallel} tensor-parallel' if s.tensor_parallel > 1 else ''}"
            f"{' (sequence-parallel)' if s.sequence_parallel else ''} "
            f"({device.type}), {config.schedule.microbatches} micro-batches, corpus "
            f"{corpus.num_bytes / 1e6:.1f} MB ({corpus.num_files} stdlib files)"
        )
        if searched is not None:
            report.print(searched)

    tokens_per_step = config.batch_size * m.seq_len
    records: list[StepRecord] = []
    retuner = Retuner(pipe, config.schedule.retune_every, report) if config.schedule.retune_every else None
    recent: collections.deque[Timeline] = collections.deque(maxlen=_NUM_COST_STEPS)
    checkpoint = Path(config.out) / CHECKPOINT_DIR
    with _progress(report, config.steps - start_step) as update:
        for step in range(start_step, config.steps):
            inputs, targets = _replica_shard(sampler.next_batch(), pipe)
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
            done = step + 1
            if retuner is not None and retuner.due(done, config.steps):
                walls = [r.seconds for r in records]
                if retuner.after_steps(done, list(recent), walls):
                    recent.clear()  # the report's prediction is of the order now running: its steps only
            due = done == config.steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
            if due:
                save_checkpoint(
                    pipe, checkpoint, optimizer=optimizers, step=done, extra={"config": config.to_dict()}
                )

    memory = _gather_memory(pipe, optimizers, recent[-1] if recent else None)
    state = _gather_state_dict(dict(pipe.state_dict()))
    result = TrainResult(steps=records)
    if rank == 0 and state is not None:
        result = _finish(
            config, layers, state, pipe, list(recent), corpus.val, records, report, memory,
            retuner.changes if retuner is not None else [],
        )
    # Peers wait for rank 0's report: a rank that exits first tears down its gloo
    # connections under rank 0, which some torch builds answer with an abort.
    dist.barrier()
    return result


def _make_pipeline(
    config: TrainConfig, layers: Sequence[Any], sampler: BatchSampler, device: torch.device
) -> tuple[Pipeline, torch.optim.Optimizer | None, str | None]:
    """The Pipeline, for flush schedules the AdamW the loop steps (async ones step inside), and
    for a searched schedule ("auto", "auto-v") what the search found, to report."""
    from pipefold.runtime import (  # deferred: the config tests import this module without it
        Pipeline,
        gpt_tensor_parallel_plan,
    )

    s, opt = config.schedule, config.optimizer
    placement = s.searched_placement
    if s.file:
        from pipefold.config import load_schedule_file

        schedule = load_schedule_file(s.file)
    else:
        schedule = s.family_schedule()  # for auto / auto-v, the stand-in until the search has run

    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            params, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay
        )

    is_flush = schedule.weight_update is WeightUpdate.FLUSH
    recompute = config.recompute
    process_group: Any = None
    if s.data_parallel > 1 or s.tensor_parallel > 1:
        from torch.distributed.device_mesh import init_device_mesh

        # Row-major (dp, pp, tp): world ranks 0..ranks x tp - 1 are replica 0, so world rank 0
        # (the one that reports) is pipeline rank 0, tp rank 0 of replica 0.
        shape: tuple[int, ...] = (s.data_parallel, s.ranks)
        names: tuple[str, ...] = ("dp", "pp")
        if s.tensor_parallel > 1:
            shape, names = (*shape, s.tensor_parallel), (*names, "tp")
        process_group = init_device_mesh(device.type, shape, mesh_dim_names=names)
    note: str | None = None
    options: dict[str, Any] = {
        "process_group": process_group,
        "partition": _partition_argument(config, schedule, layers, sampler, device),
        "recompute": list(recompute) if isinstance(recompute, tuple) else recompute,
        "device": device,
        "seed": config.seed,
        "timeout_s": config.timeout_s,
    }
    if s.tensor_parallel > 1:
        options["tensor_parallel"] = gpt_tensor_parallel_plan(sequence_parallel=s.sequence_parallel)
    if placement is not None:
        from pipefold.runtime import tune_schedule

        # Probe on the first batch without consuming it: training then starts on that batch.
        # Row-major (dp, pp, tp): this process is in replica world_rank // (ranks x tp).
        replica = dist.get_rank() // (s.ranks * s.tensor_parallel)
        probe_inputs, probe_targets = _shard_rows(sampler.peek(), replica, s.data_parallel)
        tuned = tune_schedule(
            layers,
            loss_fn=gpt_loss,
            inputs=probe_inputs,
            targets=probe_targets,
            num_microbatches=s.microbatches,
            placement=placement,
            num_virtual=s.num_virtual,
            **options,
        )
        schedule = tuned.schedule
        note = tuned.summary()
    pipe = Pipeline(
        layers,
        loss_fn=gpt_loss,
        schedule=schedule,
        optimizer=None if is_flush else make_optimizer,
        **options,
    )
    if not is_flush:
        return pipe, None, note
    if opt.zero:
        from pipefold.runtime import sharded_optimizer

        zero = sharded_optimizer(
            pipe, torch.optim.AdamW, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay
        )
        return pipe, zero, note
    return pipe, make_optimizer(list(pipe.parameters())), note


def _replica_shard(batch: tuple[Tensor, Tensor], pipe: Pipeline) -> tuple[Tensor, Tensor]:
    """This replica's rows of the global batch (every rank draws the same global batch)."""
    return _shard_rows(batch, pipe.data_parallel_rank, pipe.num_data_parallel)


def _shard_rows(batch: tuple[Tensor, Tensor], replica: int, num_replicas: int) -> tuple[Tensor, Tensor]:
    if num_replicas == 1:
        return batch
    inputs, targets = batch
    rows = inputs.shape[0] // num_replicas
    start = replica * rows
    return inputs[start : start + rows], targets[start : start + rows]


def _optimizers_of(pipe: Pipeline, optimizer: torch.optim.Optimizer | None) -> list[torch.optim.Optimizer]:
    """What holds the optimizer state: the loop's AdamW, or (asynchronous schedules) one per stage."""
    if optimizer is not None:
        return [optimizer]
    return [stage.stash.optimizer for stage in pipe.stages if stage.stash is not None]


def _resume(
    config: TrainConfig,
    pipe: Pipeline,
    optimizers: list[torch.optim.Optimizer],
    scheduler: torch.optim.lr_scheduler.LambdaLR | None,
    sampler: BatchSampler,
    report: Console | None,
) -> int:
    """Load `config.resume` (if any) and put the job where the saved run stood; returns its step."""
    if not config.resume:
        return 0
    from pipefold.runtime.checkpoint import load_checkpoint

    start_step = check_resume(config)
    load_checkpoint(pipe, config.resume, optimizer=optimizers)
    for _ in range(start_step):
        # Same batches as an uninterrupted run: the sampler's generator is advanced, not re-seeded.
        sampler.next_batch()
    if scheduler is not None:
        # The learning rate is restored with the optimizer; the scheduler only needs its step
        # count so its next step() gives the lr of step start_step + 1 (LambdaLR is closed-form).
        scheduler.last_epoch = start_step
    if report is not None:
        report.print(f"resumed from {config.resume} at step {start_step}")
    return start_step


def _partition_argument(
    config: TrainConfig,
    schedule: Schedule,
    layers: Sequence[Any],
    sampler: BatchSampler,
    device: torch.device,
) -> str | list[int]:
    """What the Pipeline gets as `partition`; "profile" is measured once, on rank 0.

    Every rank timing the layers itself would see different numbers and could cut the
    model differently, so rank 0 profiles one micro-batch and broadcasts the counts.
    """
    if isinstance(config.partition, tuple):
        return list(config.partition)
    if config.partition != "profile":
        return config.partition
    from pipefold.model import partition
    from pipefold.runtime import profile

    counts: list[list[int] | None] = [None]
    if dist.get_rank() == 0:
        rows = max(1, config.batch_size // config.schedule.data_parallel // schedule.num_microbatches)
        sample = sampler.peek()[0][:rows]
        costs = [p.total_s for p in profile(layers, sample, device=device)]
        cut = partition(layers, schedule.num_stages, "profile", placement=schedule.placement, costs=costs)
        counts[0] = [len(cut.layers_of(stage)) for stage in range(cut.num_stages)]
    dist.broadcast_object_list(counts, src=0)
    result = counts[0]
    if result is None:
        raise PipelineError("rank 0 did not send the profiled partition")
    return result


def _last_timeline(timeline: Timeline | None) -> Timeline:
    if timeline is None:
        # Pipeline records a timeline after every step unless built with record_timeline=False.
        raise PipelineError(
            "the pipeline recorded no timeline for the last step; build it with record_timeline=True"
        )
    return timeline


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
    pipe: Pipeline,
    recent: Sequence[Timeline],
    val: bytes,
    records: list[StepRecord],
    report: Console | None,
    memory: list[dict[str, int]] | None = None,
    retunes: list[dict[str, Any]] | None = None,
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
    # The wall times of the same steps give the time outside the actions (the step's
    # exchanges and the optimizer update) as the cost model's step_overhead.
    walls = [r.seconds for r in records[-len(recent) :]]
    costs = measured_cost_model(recent, pipe.schedule, step_times=walls)
    predicted = simulate(pipe.schedule, costs)
    predicted_step = predicted.makespan + costs.step_overhead
    # The stage costs this run measured, as `pipefold schedules find --costs-file` takes them.
    _atomic_write_text(out / "costs.json", json.dumps(costs.to_json(), indent=1) + "\n")
    save_png(timeline, out / "timeline.png", compare=predicted)
    save_chrome_trace(timeline, out / "trace.json")

    # The first steps pay for allocation and warm-up; the median of the rest is the steady state.
    steady = [r.seconds for r in records[1:]] or [records[0].seconds]
    step_seconds = statistics.median(steady)
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "partition": str(pipe.partition),
        "start_step": records[0].step,
        "checkpoint": str(out / CHECKPOINT_DIR),
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
        # counted activation peak.
        "memory": memory or [],
        # Where schedule.retune_every switched the order (pipefold/retune.py): the step, what ran
        # before and after, both predictions, both measurements, and whether it was kept.
        "retunes": retunes or [],
        "sample_prompt": _SAMPLE_PROMPT,
        "sample": sample,
        "torch": torch.__version__,
    }
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if report is not None:
        report.print(
            f"loss {records[0].loss:.3f} -> {records[-1].loss:.3f} (validation {val_loss:.3f}); "
            f"{summary['tokens_per_s']:,.0f} tokens/s; step {step_seconds * 1e3:.0f} ms (median); last "
            f"{len(walls)} steps {statistics.median(walls) * 1e3:.0f} ms measured, "
            f"{predicted_step * 1e3:.0f} ms predicted from their stage costs and overheads; "
            f"bubble {timeline.bubble_fraction:.0%} measured, {predicted.bubble_fraction:.0%} predicted"
        )
        if memory:
            report.print(_memory_line(memory))
        if sample:
            report.rule("sample")
            report.print(sample, markup=False, highlight=False)
            report.rule()
        report.print(
            f"wrote {out / 'timeline.png'}, {out / 'trace.json'}, {out / 'summary.json'}, "
            f"{out / 'costs.json'}, "
            f"{out / CHECKPOINT_DIR}/"
        )
    return TrainResult(steps=records, summary=summary, out_dir=out, sample=sample)


def train_worker(config: TrainConfig, show: bool = True) -> None:
    """Entry point of one spawned rank: rank 0 reports to the terminal when `show`."""
    from rich.console import Console

    try:
        train(config, console=Console() if show else None)
    finally:
        # The Pipeline sits in reference cycles that hold the rendezvous store; if they
        # are only freed at interpreter exit, rank 0's TCPStore server is destroyed during
        # static teardown and the process aborts ("terminate called without an active
        # exception", exit -6) after a successful run. Collect them while torch is alive.
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(config: TrainConfig, *, show: bool = True) -> LaunchResult:
    """Spawn `ranks x data_parallel x tensor_parallel` local workers running `train_worker`."""
    check_resume(config)
    return spawn(train_worker, config.schedule.num_processes, (config, show))
