"""Setting the training job up on one rank: device, process group and mesh, data, model,
optimizer, and the state of a run it resumes.

    job = set_up(config)           # on every rank, inside `train` (pipefold.job.loop)
    job.pipe.step(*job.next_batch())

`check_resume` reads only a checkpoint's JSON, so the CLI calls it before any worker starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pipefold.data import VOCAB_SIZE, BatchSampler, Corpus, LengthBuckets, load_corpus
from pipefold.data.tokens import TokenData, load_tokens
from pipefold.device import resolve_device
from pipefold.errors import ConfigError, PipelineError
from pipefold.hf.model import CausalLM, load_causal_lm, next_token_loss
from pipefold.job.adaptive import adaptive_runner
from pipefold.job.config import TrainConfig
from pipefold.job.optim import lr_scheduler, parameter_groups
from pipefold.job.partition_costs import flops_counts
from pipefold.job.rng import restore_rng_state
from pipefold.model import partition
from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.runtime import (
    LayoutOptions,
    ParallelOptions,
    Pipeline,
    RuntimeOptions,
    fp32_master_weights,
    gpt_tensor_parallel_plan,
    hf_tensor_parallel_plan,
    profile,
    sharded_optimizer,
    tune_schedule,
)
from pipefold.runtime.adaptive import AdaptiveRunner
from pipefold.runtime.checkpoint import load_checkpoint, read_checkpoint_info
from pipefold.runtime.parallel.tensor_parallel import TensorParallelPlan
from pipefold.runtime.processes.launch import init_process_group_from_env
from pipefold.schedule import Schedule, WeightUpdate

__all__ = ["RNG_KEY", "Job", "check_resume", "set_up", "shard_rows"]

RNG_KEY = "rng"
"""The key of every rank's random states (pipefold.job.rng) in a checkpoint's `extra`."""


@dataclass
class Job:
    """What the loop needs, set up on this rank."""

    config: TrainConfig
    device: torch.device
    rank: int
    """World rank; rank 0 reports."""
    corpus: Corpus | None
    """The built-in corpus; None where the model trains on `tokens`."""
    layers: list[Any]
    sampler: BatchSampler | LengthBuckets
    pipe: Pipeline
    optimizer: torch.optim.Optimizer | None
    """The AdamW the loop steps (flush schedules); None where the pipeline steps inside (async)."""
    optimizers: list[torch.optim.Optimizer]
    """What holds the optimizer state: `optimizer`, or (asynchronous schedules) one per stage."""
    scheduler: torch.optim.lr_scheduler.LambdaLR | None
    start_step: int
    """The step a resumed run continues from; 0 for a fresh run."""
    searched: str | None
    """For a searched schedule ("auto", "auto-v"): what the search found, to report."""
    hf: CausalLM | None = None
    """The Hugging Face model (model.path); None for the built-in GPT."""
    adaptive: AdaptiveRunner | None = None
    """With schedule.adaptive: what chooses and applies each batch's micro-batches, family and
    recomputation (pipefold.job.adaptive)."""
    tokens: TokenData | None = None
    """Its train and validation ids."""

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """This replica's rows of the next global batch (every rank draws the same one)."""
        batch = self.sampler.next_batch()
        return shard_rows(batch, self.pipe.data_parallel_rank, self.pipe.num_data_parallel)


def set_up(config: TrainConfig) -> Job:
    """Join the process group (from torchrun's variables unless already in one) and build the job."""
    device = resolve_device(config.device)
    init_process_group_from_env(
        backend="nccl" if device.type == "cuda" else "gloo", timeout_s=config.timeout_s
    )
    s = config.schedule
    if dist.get_world_size() != s.num_processes:
        raise ConfigError(
            f"schedule.ranks={s.ranks} x schedule.data_parallel={s.data_parallel} x "
            f"schedule.tensor_parallel={s.tensor_parallel} needs {s.num_processes} processes but "
            f"{dist.get_world_size()} were started; launch {s.num_processes} processes or change "
            "schedule.ranks / schedule.data_parallel / schedule.tensor_parallel to match"
        )
    if not config.out:
        raise ConfigError("out is empty; call resolve_out_dir(config) before starting the ranks")
    torch.manual_seed(config.seed)

    m = config.model
    corpus: Corpus | None = None
    hf: CausalLM | None = None
    tokens: TokenData | None = None
    if m.hf is not None:
        # Every parameter stays on meta here; the Pipeline materializes this rank's layers only.
        hf = load_causal_lm(m.path, seed=config.seed, seq_len=m.seq_len)
        tokens = _hf_tokens(config)
        layers: list[Any] = list(hf.layers)
        loss_fn: Callable[[Tensor, Tensor], Tensor] = next_token_loss
        stream: Any = tokens.train
    else:
        corpus = load_corpus(config.data.max_bytes, config.data.val_fraction)
        layers = gpt_layers(
            VOCAB_SIZE, m.d_model, m.num_heads, m.num_layers, m.seq_len, tie_embeddings=m.tie_embeddings,
            dropout=m.dropout, attention=m.attention,
        )
        loss_fn = gpt_loss
        stream = corpus.train
    sampler: BatchSampler | LengthBuckets
    if config.data.bucket_by_length:
        # Lines of the byte corpus, each step one bucket length: the token budget of a fixed
        # step, rows a multiple of what the micro-batches of every replica need.
        sampler = LengthBuckets(
            stream, separator=ord("\n"), token_budget=config.batch_size * m.seq_len, max_len=m.seq_len,
            min_len=config.data.bucket_min_len,
            row_multiple=config.schedule.num_microbatches * config.schedule.data_parallel, seed=config.seed,
        )
    else:
        sampler = BatchSampler(stream, batch_size=config.batch_size, seq_len=m.seq_len, seed=config.seed)
    pipe, searched = _make_pipeline(config, layers, sampler, device, loss_fn)
    optimizer = _make_loop_optimizer(config, pipe)
    optimizers = [optimizer] if optimizer is not None else _stage_optimizers(pipe)
    opt = config.optimizer
    scheduler = (
        lr_scheduler(
            optimizer, schedule=opt.lr_schedule, warmup_steps=opt.warmup_steps, total_steps=config.steps,
            lr=opt.lr, min_lr=opt.min_lr,
        )
        if optimizer is not None
        else None
    )
    start_step = _resume(config, pipe, optimizers, scheduler, sampler, device)
    adaptive = None
    if config.schedule.adaptive:
        shapes = sampler.shapes if isinstance(sampler, LengthBuckets) else [(config.batch_size, m.seq_len)]
        adaptive = adaptive_runner(config, pipe, shapes)
    return Job(
        config=config, device=device, rank=dist.get_rank(), corpus=corpus, layers=layers,
        sampler=sampler, pipe=pipe, optimizer=optimizer, optimizers=optimizers, scheduler=scheduler,
        start_step=start_step, searched=searched, hf=hf, tokens=tokens, adaptive=adaptive,
    )


def _hf_tokens(config: TrainConfig) -> TokenData:
    """The ids a Hugging Face model trains on: data.path, or the built-in corpus tokenized."""
    files = config.model.hf
    assert files is not None
    d = config.data
    tokenizer = files.tokenizer_file
    if d.path:
        return load_tokens(
            d.path, vocab_size=files.vocab_size, tokenizer_file=tokenizer, token_dtype_name=d.token_dtype,
            val_fraction=d.val_fraction,
        )
    import tempfile
    from pathlib import Path

    corpus = load_corpus(d.max_bytes, d.val_fraction)
    with tempfile.TemporaryDirectory() as scratch:
        text = Path(scratch) / "corpus.txt"
        text.write_bytes(corpus.train + corpus.val)
        return load_tokens(
            text, vocab_size=files.vocab_size, tokenizer_file=tokenizer, val_fraction=d.val_fraction
        )


def check_resume(config: TrainConfig) -> int:
    """The step `config.resume` continues from (0 without one); refuses a bad checkpoint early.

    Reads only the checkpoint's JSON, so it runs before any worker starts.
    """
    if not config.resume:
        return 0
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


def shard_rows(batch: tuple[Tensor, Tensor], replica: int, num_replicas: int) -> tuple[Tensor, Tensor]:
    """Replica `replica`'s equal share of the rows of `batch`."""
    if num_replicas == 1:
        return batch
    inputs, targets = batch
    rows = inputs.shape[0] // num_replicas
    start = replica * rows
    return inputs[start : start + rows], targets[start : start + rows]


def _mesh(config: TrainConfig, device: torch.device) -> DeviceMesh | None:
    """The (dp, pp[, tp]) mesh where there is more than one pipeline dimension; None otherwise.

    Row-major: world ranks 0..ranks x tp - 1 are replica 0, so world rank 0 (the one that
    reports) is pipeline rank 0, tp rank 0 of replica 0.
    """
    s = config.schedule
    if s.data_parallel == 1 and s.tensor_parallel == 1:
        return None
    shape: tuple[int, ...] = (s.data_parallel, s.ranks)
    names: tuple[str, ...] = ("dp", "pp")
    if s.tensor_parallel > 1:
        shape, names = (*shape, s.tensor_parallel), (*names, "tp")
    return init_device_mesh(device.type, shape, mesh_dim_names=names)


def _tensor_parallel_plan(config: TrainConfig) -> TensorParallelPlan | None:
    """The plan `--tensor-parallel` splits the model by: Megatron's, for the built-in GPT or a
    Hugging Face model of a family that has one (TrainConfig has refused the others)."""
    s = config.schedule
    if s.tensor_parallel == 1:
        return None
    if config.model.hf is not None:
        return hf_tensor_parallel_plan()
    return gpt_tensor_parallel_plan(sequence_parallel=s.sequence_parallel, vocab_parallel=s.vocab_parallel)


def _adamw(config: TrainConfig) -> Callable[[Any], torch.optim.Optimizer]:
    opt = config.optimizer
    # bf16-pure: the stages hold bf16 weights; AdamW steps their fp32 master copies.
    pure = config.compute_precision == "bf16-pure"
    adamw = fp32_master_weights(torch.optim.AdamW) if pure else torch.optim.AdamW

    def make(params: Any) -> torch.optim.Optimizer:
        return adamw(params, lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)

    return make


def _make_pipeline(
    config: TrainConfig,
    layers: Sequence[Any],
    sampler: BatchSampler | LengthBuckets,
    device: torch.device,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = gpt_loss,
) -> tuple[Pipeline, str | None]:
    """The Pipeline running `config.schedule.built` (or, for "auto" / "auto-v", the order searched
    on the ranks), and for a searched schedule what the search found, to report."""
    s = config.schedule
    schedule = s.built
    recompute = config.recompute
    layout = LayoutOptions(
        partition=_partition_argument(config, schedule, layers, sampler, device),
        recompute=list(recompute) if isinstance(recompute, tuple) else recompute,
        device=device,
        seed=config.seed,
    )
    parallel = ParallelOptions(
        process_group=_mesh(config, device),
        shard="full" if s.shard == "full" else "replicate",
        free_between_microbatches=s.free_between_microbatches,
        gather_lookahead=s.gather_lookahead,
        tensor_parallel=_tensor_parallel_plan(config),
    )
    # TrainConfig has checked the value against NONFINITE_CHOICES.
    on_nonfinite: Literal["raise", "skip"] = "skip" if config.on_nonfinite == "skip" else "raise"
    precisions: dict[str, Literal["fp32", "bf16", "fp16", "bf16-pure"]] = {
        "fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "bf16-pure": "bf16-pure",
    }
    precision = precisions[config.compute_precision]
    runtime = RuntimeOptions(
        timeout_s=config.timeout_s, on_nonfinite=on_nonfinite, precision=precision,
        loss_scale=config.loss_scale if precision == "fp16" else None, compile=config.compile,
    )
    note: str | None = None
    placement = s.searched_placement
    if placement is not None:
        # Probe on the first batch without consuming it: training then starts on that batch.
        # Row-major (dp, pp, tp): this process is in replica world_rank // (ranks x tp).
        replica = dist.get_rank() // (s.ranks * s.tensor_parallel)
        probe_inputs, probe_targets = shard_rows(sampler.peek(), replica, s.data_parallel)
        tuned = tune_schedule(
            layers,
            loss_fn=loss_fn,
            inputs=probe_inputs,
            targets=probe_targets,
            num_microbatches=s.num_microbatches,
            placement=placement,
            num_virtual=s.num_virtual,
            layout=layout,
            parallel=parallel,
            runtime=runtime,
        )
        schedule = tuned.schedule
        note = tuned.summary()
    is_flush = schedule.weight_update is WeightUpdate.FLUSH
    pipe = Pipeline(
        layers,
        loss_fn=loss_fn,
        schedule=schedule,
        layout=layout,
        parallel=replace(parallel, optimizer=None if is_flush else _adamw(config)),
        runtime=runtime,
    )
    return pipe, note


def _make_loop_optimizer(config: TrainConfig, pipe: Pipeline) -> torch.optim.Optimizer | None:
    """The AdamW the loop steps after each flush step (ZeRO-sharded where asked); None where the
    schedule updates the weights inside the step."""
    if pipe.schedule.weight_update is not WeightUpdate.FLUSH:
        return None
    opt = config.optimizer
    params: Any = list(pipe.parameters())
    if opt.weight_decay_groups:
        params = parameter_groups(pipe.local_modules.values(), params, weight_decay=opt.weight_decay)
    if opt.zero or config.schedule.shard == "zero1":
        # bf16-pure: each replica keeps the fp32 masters of the parameters it owns.
        pure = config.compute_precision == "bf16-pure"
        adamw = fp32_master_weights(torch.optim.AdamW) if pure else torch.optim.AdamW
        zero: torch.optim.Optimizer = sharded_optimizer(
            pipe, adamw, params=params, lr=opt.lr, betas=(opt.beta1, opt.beta2),
            weight_decay=opt.weight_decay,
        )
        return zero
    return _adamw(config)(params)


def _stage_optimizers(pipe: Pipeline) -> list[torch.optim.Optimizer]:
    """An asynchronous schedule's optimizers: one per stage, inside the pipeline."""
    return [stage.stash.optimizer for stage in pipe.stages if stage.stash is not None]


def _resume(
    config: TrainConfig,
    pipe: Pipeline,
    optimizers: list[torch.optim.Optimizer],
    scheduler: torch.optim.lr_scheduler.LambdaLR | None,
    sampler: BatchSampler | LengthBuckets,
    device: torch.device,
) -> int:
    """Load `config.resume` (if any) and put the job where the saved run stood; returns its step.

    The random states (dropout, batch order) come from the checkpoint (pipefold.job.rng); one
    saved without them, or by another number of processes, continues the batch order by replay.
    """
    if not config.resume:
        return 0
    start_step = check_resume(config)
    load_checkpoint(pipe, config.resume, optimizer=optimizers)
    extra = read_checkpoint_info(config.resume).extra
    states = extra.get(RNG_KEY) if isinstance(extra, dict) else None
    if not restore_rng_state(states, sampler, device):
        for _ in range(start_step * config.grad_accumulation):
            # Same batches as an uninterrupted run: the sampler's generator is advanced, not re-seeded.
            sampler.next_batch()
    if scheduler is not None:
        # The learning rate is restored with the optimizer; the scheduler only needs its step
        # count so its next step() gives the lr of step start_step + 1 (LambdaLR is closed-form).
        scheduler.last_epoch = start_step
    return start_step


def _partition_argument(
    config: TrainConfig,
    schedule: Schedule,
    layers: Sequence[Any],
    sampler: BatchSampler | LengthBuckets,
    device: torch.device,
) -> str | list[int]:
    """What the Pipeline gets as `partition`; "flops" is the estimate's per-stage counts (the same on
    every rank, no measurement), "profile" is measured once, on rank 0.

    Every rank timing the layers itself would see different numbers and could cut the
    model differently, so rank 0 profiles one micro-batch and broadcasts the counts.
    """
    if isinstance(config.partition, tuple):
        return list(config.partition)
    if config.partition == "flops":
        return flops_counts(schedule.num_stages, config.model)
    if config.partition != "profile":
        return config.partition
    counts: list[list[int] | None] = [None]
    if dist.get_rank() == 0:
        rows = max(1, config.batch_size // config.schedule.data_parallel // schedule.num_microbatches)
        sample = sampler.peek()[0][:rows]
        costs = [layer.total_s for layer in profile(layers, sample, device=device)]
        cut = partition(layers, schedule.num_stages, "profile", placement=schedule.placement, costs=costs)
        counts[0] = [len(cut.layers_of(stage)) for stage in range(cut.num_stages)]
    dist.broadcast_object_list(counts, src=0)
    result = counts[0]
    if result is None:
        raise PipelineError("rank 0 did not send the profiled partition")
    return result
