"""The training job's configuration (`pipefold train`): typed, validated, torch-free.

    from pipefold.job.config import load_config
    config = load_config("job.toml", {"schedule.ranks": 4, "steps": 10})
    config.schedule.built          # the Schedule that will run, built (or read) once

A `TrainConfig` is built from defaults, then a TOML file, then overrides, and is checked
as a whole on construction, the schedule included, so a bad value is refused before torch
is imported or any process starts. Every refusal is a `ConfigError` naming the field
(dotted, as in the TOML file), the value and a fix.

TOML layout (every key optional; these are the defaults, as tests/test_config.py checks)::

    steps = 300
    batch_size = 32
    seed = 0
    partition = "flops"        # stages of even estimated FLOPs; "uniform" (layer counts), or counts,
                               # e.g. [3, 5]
    recompute = "none"         # "full", "selective" (attention cores), or a list of layer indices
    out = ""                   # "" = runs/<timestamp>
    timeout_s = 60.0
    device = "auto"            # "cpu", "cuda"
    sample_tokens = 300
    checkpoint_every = 0       # also save every N steps into <out>/checkpoint (0 = only at the end)
    grad_accumulation = 1      # pipeline steps (batches of batch_size) per optimizer step
    eval_every = 50            # validation loss through the pipeline every N steps and at the end (0 = off)
    eval_batches = 4           # held-out batches (of batch_size) per evaluation
    resume = ""                # a checkpoint directory to continue from ("" = start fresh)
    on_nonfinite = "raise"     # a NaN/inf loss stops the run; "skip" drops that step's update
    precision = "auto"         # bf16 where measured faster (docs/training.md), else fp32; or fp32/bf16/...
    loss_scale = 65536.0       # fp16's initial dynamic loss scale (halved on overflow, every rank alike)
    compile = false            # run each layer through torch.compile (needs a C++ compiler)
    hardware = ""              # a hardware preset or file (as `pipefold plan --hardware`): mfu in metrics
    overwrite = false          # replace the checkpoint of an earlier run in `out` (else refused)
    max_restarts = 0           # local runs: restart all ranks from the latest checkpoint after a failure
    async_checkpoint = false   # write checkpoints in the background (the loop waits only for a host copy)
    memory_peaks = false       # CPU: each rank's allocated-bytes peaks by torch's profiler (slower steps)

    [model]
    path = ""                  # a Hugging Face model directory or config.json ("" = the built-in GPT)
    d_model = 128
    num_heads = 4
    num_layers = 4
    seq_len = 128
    tie_embeddings = true      # head shares the token embedding
    dropout = 0.0              # while training (built-in GPT only): residual, or Megatron's if unfused
    attention = "fused"        # "unfused": Megatron-LM's attention (scores, softmax, dropout kept)

    [data]
    path = ""                  # text file / directory, or token file <name>.bin (needs model.path)
    token_dtype = "auto"       # a token file's ids: "uint16", "uint32", or by the vocabulary size
    max_bytes = 4000000
    val_fraction = 0.1
    bucket_by_length = false   # batches of lines of similar length, each step its own length (no padding)
    bucket_min_len = 8         # the shortest bucket length

    [schedule]
    name = "1f1b"
    ranks = 2
    num_microbatches = 8       # flag: --microbatches
    virtual = 0                # 0 = the family's default
    data_parallel = 1          # replicas of the pipeline; processes = ranks x data_parallel x tensor_parallel
    tensor_parallel = 1        # each block's heads and MLP split over this many ranks per stage ("tp")
    sequence_parallel = false  # with tensor_parallel > 1: also split norms and boundaries by position
    vocab_parallel = false     # with tensor_parallel > 1: split the embedding, head and loss by vocabulary
    shard = "replicate"        # with data_parallel > 1: "zero1" (AdamW's state) or "full" (FSDP2 per stage)
    file = ""                  # a schedule JSON to run instead of `name` (e.g. a found one)
    retune_every = 0           # re-search the order from the run's measured costs every N steps
    streaming = false          # pipedream / pipedream-2bw: overlap consecutive steps (Pipeline.train)
    adaptive = false           # choose micro-batches, family and recomputation per batch length (--adaptive)
    memory_limit = ""          # bytes per rank the adaptive choice must fit, e.g. "2GiB"; "" = no limit

    [optimizer]
    lr = 3e-3
    weight_decay = 0.1
    beta1 = 0.9
    beta2 = 0.95
    warmup_steps = 20
    lr_schedule = "cosine"     # after the warm-up: "constant", "cosine" or "linear" decay to min_lr
    min_lr = 0.0               # where a decaying schedule ends (at the last step)
    weight_decay_groups = true # no weight decay on norms, biases and embeddings (false: on all)
    clip_grad_norm = "auto"    # global-norm clip: 1.0 for flush schedules, off for asynchronous ones; 0 = off
    zero = false               # shard AdamW's state over the data-parallel replicas (ZeRO-1)
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipefold.data.corpus import corpus_split_sizes
from pipefold.data.tokens import is_token_file, token_split_sizes
from pipefold.device import DEVICE_CHOICES, check_compiler, has_cuda, native_bf16
from pipefold.errors import ConfigError
from pipefold.hf.files import TENSOR_PARALLEL_FAMILIES, ModelFiles, check_tokenizer
from pipefold.job.adaptive_choice import gpt_chooser, longest_batch
from pipefold.job.partition_costs import job_bounds
from pipefold.job.sections import (
    CLIP_AUTO,
    DEFAULT_CLIP_NORM,
    NUM_EXTRA_LAYERS,
    PARALLEL_NAMES,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    require,
)
from pipefold.job.toml_fields import apply_override, build_fields, parse_override
from pipefold.plan.estimate import gpt_flops_per_token
from pipefold.plan.hardware import load_hardware
from pipefold.plan.hf_estimate import hf_flops_per_token
from pipefold.schedule import Schedule
from pipefold.schedule.placement import layout_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser under its PyPI name.
    import tomli as tomllib

__all__ = [
    "TrainConfig",
    "PARTITION_METHODS",
    "CHECKPOINT_DIR",
    "HF_DIR",
    "NONFINITE_CHOICES",
    "PRECISION_CHOICES",
    "load_config",
    "parse_override",
]

PARTITION_METHODS = ("flops", "uniform", "parameters", "profile")
"""Named partition methods; "type:<regex>" and explicit per-stage counts are accepted too."""

NONFINITE_CHOICES = ("raise", "skip")
"""What `on_nonfinite` may be (`Pipeline(on_nonfinite=)`)."""

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16", "bf16-pure")
"""What `precision` may be: "auto" (`TrainConfig.compute_precision`), or `RuntimeOptions(precision=)`'s."""

AUTO_BF16_MIN_D_MODEL = 128
"""precision = "auto" on a CPU: the built-in GPT's smallest d_model that trains in bf16 (the main
job's, where bf16 measured faster than fp32 on a CPU with AMX; docs/training.md, "The main
job's precision default")."""

CHECKPOINT_DIR = "checkpoint"
"""Where in `out` the job saves its checkpoint."""

HF_DIR = "hf"
"""Where in `out` the job saves a Hugging Face model (model.path) in its own format."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything `pipefold train` needs; validated as a whole on construction."""

    SECTION: ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    steps: int = 300
    """Optimizer steps (one pipeline call each)."""
    batch_size: int = 32
    """Sequences per step, split into schedule.num_microbatches micro-batches (unevenly if need be)."""
    seed: int = 0
    """Seeds the weights (per layer, independent of the partition) and the batch order."""
    partition: str | tuple[int, ...] = "flops"
    """"flops" (even estimated FLOPs per stage: pipefold.job.partition_costs), "uniform" (even layer
    counts), "parameters", "profile", "type:<regex>", or per-stage layer counts."""
    recompute: str | tuple[int, ...] = "none"
    """"none", "full" (keep stage inputs, recompute in backward), "selective" (only the attention
    core of each block: QK^T, softmax, attention over V), or layer indices to recompute."""
    out: str = ""
    """Output directory; "" = runs/<timestamp>."""
    timeout_s: float = 60.0
    """A rank waiting longer than this on a peer stops with an error instead of hanging."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu" or "cuda"."""
    sample_tokens: int = 300
    """Bytes sampled from the trained model at the end (0 = no sample)."""
    checkpoint_every: int = 0
    """Save a checkpoint into <out>/checkpoint every this many steps; 0 = only at the end (always)."""
    resume: str = ""
    """Checkpoint directory to continue from (weights, optimizer, step counter); "" = start fresh."""
    grad_accumulation: int = 1
    """Pipeline steps per optimizer step: their gradients are averaged, so the global batch is
    batch_size x grad_accumulation sequences. `steps` counts optimizer steps."""
    eval_every: int = 50
    """Every this many steps and after the last, the validation loss of `eval_batches` held-out
    batches through the pipeline, forward only, on every rank (`Pipeline.evaluate`); 0: never
    (the end-of-run validation on rank 0 is made either way)."""
    eval_batches: int = 4
    """Held-out batches of batch_size sequences per evaluation; the same batches every time."""
    on_nonfinite: str = "raise"
    """A non-finite loss: "raise" stops the run naming the step; "skip" drops that step's
    gradients (a warning) and goes on. Flush schedules only."""
    precision: str = "auto"
    """"fp32", "bf16" or "fp16": each stage computes under autocast in that dtype with fp32
    weights and optimizer state, and boundary tensors travel in it (docs/training.md).
    "bf16-pure": as bf16, with the weights and gradients held in bf16 on the stages and fp32
    master copies in the optimizer step (with optimizer.zero each replica keeps the masters of
    its own share; with schedule.shard = "full" of its own shards; with an asynchronous schedule
    each stage's optimizer keeps its stage's). "auto": bf16
    where it is measured not slower than fp32, else fp32 (`compute_precision`)."""
    loss_scale: float = 65536.0
    """fp16's initial dynamic loss scale; a step that overflows on any rank is skipped on every
    rank and the scale halved. Unused by fp32 and bf16."""
    compile: bool = False
    """Run each layer of each stage through torch.compile (inductor; docs/training.md). Refused
    where there is no C++ compiler, and with schedule.tensor_parallel > 1."""
    hardware: str = ""
    """A hardware preset (pipefold.plan.hardware.PRESETS) or TOML file, as `pipefold plan
    --hardware` takes: its peak FLOP/s for the precision's dtype, times the job's processes (one
    device each), is the peak `metrics.jsonl`'s `mfu` divides by (FLOPs per token: the built-in
    GPT's, or a Hugging Face model's from its config.json); "" = no mfu."""
    overwrite: bool = False
    """Let this run replace the checkpoint an earlier run left in `out`; without it (and without
    resuming from that checkpoint) such an `out` is refused before the run starts."""
    max_restarts: int = 0
    """A local run (`run_local`) whose rank fails restarts all ranks up to this many times, each
    restart resuming from the latest checkpoint in <out>/checkpoint (needs checkpoint_every).
    Under torchrun use its own --max-restarts (pipefold.job.recovery)."""
    async_checkpoint: bool = False
    """Write checkpoints in a background thread: the step loop waits only for the copy of this
    rank's tensors to host memory (pipefold.runtime.checkpoint_async.AsyncCheckpointer); the next save
    and the end of the run wait for the write."""
    memory_peaks: bool = False
    """On CPU, record each rank's allocated-bytes peaks over the kept steps with torch's profiler
    (`profile_memory`: every allocation and free), as a CUDA rank's allocator reports them:
    summary.json's memory gets the cpu_* keys (pipefold.job.allocator_peaks.CPU_MEMORY_KEYS).
    The profiler slows the steps and keeps its events until the run ends: for a check of a few
    steps, not a timed run. A CUDA rank records its allocator's peaks either way."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "steps", self.steps, "use at least 1 step")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "use at least 1")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "use a positive number of seconds")
        require(self.sample_tokens >= 0, "sample_tokens", self.sample_tokens, "use >= 0")
        require(
            self.checkpoint_every >= 0,
            "checkpoint_every",
            self.checkpoint_every,
            "use a number of steps >= 1, or 0 to save only at the end",
        )
        require(
            self.on_nonfinite in NONFINITE_CHOICES,
            "on_nonfinite",
            self.on_nonfinite,
            "use " + " or ".join(f'"{choice}"' for choice in NONFINITE_CHOICES),
        )
        require(
            self.precision in PRECISION_CHOICES,
            "precision",
            self.precision,
            "use " + " or ".join(f'"{choice}"' for choice in PRECISION_CHOICES),
        )
        require(
            self.precision != "fp16" or 0 < self.loss_scale < math.inf,
            "loss_scale",
            self.loss_scale,
            "fp16 gradients underflow without a loss scale; give a positive initial scale, e.g. 65536.0",
        )
        if self.compile:
            check_compiler("compile")
        if self.hardware:
            self._check_hardware()
        require(
            self.device in DEVICE_CHOICES,
            "device",
            self.device,
            "use " + ", ".join(f'"{choice}"' for choice in DEVICE_CHOICES),
        )
        dp = self.schedule.data_parallel
        require(
            self.batch_size % dp == 0,
            "batch_size",
            self.batch_size,
            f"schedule.data_parallel={dp} replicas each take an equal shard of the batch; use a "
            f"multiple of {dp} (e.g. {dp * max(1, round(self.batch_size / dp))})",
        )
        require(
            self.batch_size // dp >= self.schedule.num_microbatches,
            "batch_size",
            self.batch_size,
            f"every one of schedule.num_microbatches={self.schedule.num_microbatches} micro-batches needs "
            f"at least one sequence per replica; use batch_size >= {self.schedule.num_microbatches * dp} "
            "or fewer micro-batches",
        )
        if self.model.dropout > 0 and self.model.attention == "fused":
            # Recomputation would draw new masks in backward (no generator replay), and tp ranks
            # would each draw their own for a replicated activation.
            require(
                # The attention core has no dropout: recomputing it draws nothing.
                self.recompute in ("none", "selective") and self.schedule.tensor_parallel == 1,
                "model.dropout",
                self.model.dropout,
                "dropout is not supported with recompute or tensor_parallel > 1 yet; use 0 "
                '(or model.attention = "unfused", whose seeded dropout recomputes and runs under '
                "tensor parallelism)",
            )
        require(self.max_restarts >= 0, "max_restarts", self.max_restarts, "use >= 0 (0 = no restarts)")
        require(
            not (self.max_restarts and not self.checkpoint_every), "max_restarts", self.max_restarts,
            "a restart resumes from the latest checkpoint; also set checkpoint_every "
            "(e.g. --checkpoint-every 50)",
        )
        require(self.grad_accumulation >= 1, "grad_accumulation", self.grad_accumulation, "use >= 1")
        require(self.eval_every >= 0, "eval_every", self.eval_every, "use a number of steps, or 0 (never)")
        require(self.eval_batches >= 1, "eval_batches", self.eval_batches, "use at least 1 batch")
        if self.eval_every:
            self._check_held_out()
        num_stages = self.schedule.built.num_stages
        weight_update = str(self.schedule.built.weight_update)
        require(
            self.precision != "fp16" or weight_update == "flush",
            "precision",
            self.precision,
            f"schedule.name={self.schedule.name!r} updates weights inside the step, before every rank "
            "agrees on an overflow; use a flush schedule for fp16, or bf16",
        )
        if weight_update != "flush":
            self._check_asynchronous()
        if self.schedule.retune_every:
            self._check_retune(weight_update)
        num_layers = self.model.num_model_layers
        if self.model.hf is not None:
            self._check_hf(self.model.hf)
        elif self.data.path:
            raise ConfigError(
                f"data.path={self.data.path!r} is not allowed with the built-in GPT (it trains on the stdlib "
                "corpus, byte by byte); give a Hugging Face model too (model.path / --model)"
            )
        if self.data.bucket_by_length:
            self._check_buckets()
        self.schedule.parallel(
            weight_update=weight_update,
            recompute=self.recompute,
            on_nonfinite=self.on_nonfinite,
            compile=self.compile,
            zero=self.optimizer.zero,
            # "auto" is fp32 or bf16, which the rulebook treats alike (not resolved here: that may
            # import torch, and bad input is refused before it is).
            precision="fp32" if self.precision == "auto" else self.precision,
            tied_layers=self.model.tied,
            num_layers=num_layers,
            num_heads=self.model.heads,
            seq_len=self.model.seq_len,
            vocab_size=self.model.vocab_size,
        ).check(PARALLEL_NAMES)
        if self.model.hf is not None:
            require(
                num_layers >= num_stages,
                "model.path",
                self.model.path,
                f"the model has {num_layers} pipeline layers ({self.model.hf.num_layers} blocks + embeddings "
                f"+ head) but the schedule has {num_stages} stages and each needs one; use fewer ranks / "
                "virtual stages",
            )
        require(
            num_layers >= num_stages,
            "model.num_layers",
            self.model.num_layers,
            f"the GPT has {num_layers} layers (num_layers + {NUM_EXTRA_LAYERS}) but the schedule has "
            f"{num_stages} stages and each needs one; use model.num_layers >= "
            f"{num_stages - NUM_EXTRA_LAYERS} or fewer ranks / virtual stages",
        )
        self._check_partition(num_stages, num_layers)
        if self.schedule.adaptive:
            self._check_adaptive()

    def _check_held_out(self) -> None:
        """Evaluation needs held-out data: at least one sequence (model.seq_len + 1 tokens) in the
        validation split, sized from the files without reading them. Text a Hugging Face
        tokenizer must read first is checked on the ranks (the sampler refuses it there)."""
        d, seq_len = self.data, self.model.seq_len
        if self.model.hf is None:
            train, held_out = corpus_split_sizes(d.max_bytes, d.val_fraction)
            total, what = train + held_out, "bytes of the built-in corpus"
        elif d.path and is_token_file(d.path):
            sizes = token_split_sizes(
                d.path, vocab_size=self.model.hf.vocab_size, token_dtype_name=d.token_dtype,
                val_fraction=d.val_fraction,
            )
            total, held_out, what = sum(sizes), sizes[1], f"ids of data.path={d.path!r}"
        else:
            return
        require(
            held_out >= seq_len + 1,
            "eval_every",
            self.eval_every,
            f"evaluation needs held-out data, and the validation split (data.val_fraction={d.val_fraction} "
            f"of {total} {what}) holds {held_out}, fewer than one sequence of model.seq_len + 1 = "
            f"{seq_len + 1}; raise data.val_fraction or data.max_bytes (or give more data), or set "
            "eval_every = 0 (no evaluation)",
        )

    def _check_hardware(self) -> None:
        try:
            load_hardware(self.hardware).peak(self.compute_dtype_name)
        except ConfigError as error:
            chosen = (
                f' (precision "auto" chose {self.compute_precision} here; set precision explicitly, '
                'e.g. --precision fp32)' if self.precision == "auto" else ""
            )
            raise ConfigError(f"hardware={self.hardware!r} is not allowed: {error}{chosen}") from None

    @property
    def peak_flops(self) -> float | None:
        """The job's devices' peak FLOP/s in its compute dtype (`hardware`), summed over its
        processes; None without `hardware`."""
        if not self.hardware:
            return None
        return load_hardware(self.hardware).peak(self.compute_dtype_name) * self.schedule.num_processes

    @property
    def compute_dtype_name(self) -> str:
        """The dtype the matrix products run in, as hardware files name it ("fp32", "bf16", "fp16")."""
        precision = self.compute_precision
        return "bf16" if precision == "bf16-pure" else precision

    @property
    def compute_precision(self) -> str:
        """`precision` with "auto" resolved (once per config object, on first use; every rank of
        one machine, or of machines alike, gets the same answer; on mixed hardware set it):
        "bf16" on a CUDA GPU with native bf16, or on a CPU with AMX / AVX512-BF16 for the
        built-in GPT at d_model >= AUTO_BF16_MIN_D_MODEL; else "fp32". A Hugging Face model
        stays fp32 on the CPU: its attention runs torch's 16-bit CPU attention backward, which
        is several times slower than fp32's (the built-in GPT runs that core in fp32)."""
        if self.precision != "auto":
            return self.precision
        resolved: str | None = self.__dict__.get("_precision")
        if resolved is None:
            resolved = "bf16" if self._bf16_measured_faster() else "fp32"
            object.__setattr__(self, "_precision", resolved)
        return resolved

    def _bf16_measured_faster(self) -> bool:
        device = self.device
        if device == "auto":
            device = "cuda" if has_cuda() else "cpu"
        if not native_bf16(device):
            return False
        if device == "cuda":
            return True
        return self.model.hf is None and self.model.d_model >= AUTO_BF16_MIN_D_MODEL

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token: a Hugging Face model's from its config.json's sizes
        (`hf_flops_per_token`), else the built-in GPT's (`gpt_flops_per_token`; its
        vocabulary is the 256 byte values, the function's default)."""
        m = self.model
        if m.hf is not None:
            return hf_flops_per_token(m.hf.config, seq_len=m.seq_len)
        return gpt_flops_per_token(num_layers=m.num_layers, d_model=m.d_model, seq_len=m.seq_len)

    def _check_hf(self, files: ModelFiles) -> None:
        """A Hugging Face model: what pipefold can run, and data its tokenizer can make."""
        require(
            self.recompute != "selective",
            "recompute",
            self.recompute,
            "selective recomputation reruns the built-in GPT's attention cores; a Hugging Face model "
            "has none marked: use 'full' or a list of layer indices",
        )
        tp = self.schedule.tensor_parallel
        if tp > 1:
            require(
                files.model_type in TENSOR_PARALLEL_FAMILIES,
                "schedule.tensor_parallel",
                tp,
                f"pipefold has no tensor-parallel plan for Hugging Face {files.model_type} models; use 1 "
                f"(pipeline and data parallelism apply), or a {'/'.join(sorted(TENSOR_PARALLEL_FAMILIES))} "
                "model",
            )
            require(
                not self.schedule.sequence_parallel,
                "schedule.sequence_parallel",
                self.schedule.sequence_parallel,
                "sequence parallelism is planned for the built-in GPT only; a Hugging Face model runs "
                "plain tensor parallelism: use sequence_parallel = false",
            )
            require(
                not self.schedule.vocab_parallel,
                "schedule.vocab_parallel",
                self.schedule.vocab_parallel,
                "the vocabulary-parallel embedding and head are planned for the built-in GPT only; use "
                "vocab_parallel = false",
            )
            heads, kv_heads = files.num_heads, files.num_kv_heads
            counts = ((heads, "attention heads"), (kv_heads, "key/value heads (num_key_value_heads)"))
            for count, what in counts:
                require(
                    count % tp == 0,
                    "schedule.tensor_parallel",
                    tp,
                    f"{files.config_path} has {count} {what}, which {tp} tensor-parallel ranks cannot "
                    f"share (each takes whole heads); use a degree dividing {math.gcd(heads, kv_heads)}",
                )
        require(
            self.model.seq_len <= files.max_positions,
            "model.seq_len",
            self.model.seq_len,
            f"{files.config_path} allows {files.max_positions} positions; use model.seq_len <= "
            f"{files.max_positions}",
        )
        if not self.data.path or not Path(self.data.path).suffix == ".bin":
            # Text (the given one, or the built-in corpus) is tokenized with the model's tokenizer.
            try:
                check_tokenizer(files)
            except ConfigError as error:
                given = f"data.path={self.data.path!r}"
                where = given if self.data.path else "data.path unset (the built-in corpus)"
                raise ConfigError(f"{where}: {error}") from None

    def _check_buckets(self) -> None:
        """data.bucket_by_length: lines of the byte corpus, cut to lengths every rank can split."""
        require(
            self.model.hf is None, "data.bucket_by_length", True,
            "bucketing by length reads lines of the built-in corpus; it is not there yet for a Hugging "
            "Face model's token data (model.path): drop --bucket-by-length or model.path",
        )
        require(
            not self.schedule.sequence_parallel, "data.bucket_by_length", True,
            "sequence parallelism splits every length over the tp ranks, which bucket lengths need not "
            "divide; drop --sequence-parallel or --bucket-by-length",
        )
        require(
            self.data.bucket_min_len <= self.model.seq_len, "data.bucket_min_len", self.data.bucket_min_len,
            f"the shortest bucket must fit model.seq_len={self.model.seq_len}; "
            f"use at most {self.model.seq_len}",
        )

    def _check_adaptive(self) -> None:
        """schedule.adaptive: the built-in GPT, whose costs the chooser estimates per length (each
        pipeline call, accumulated ones too, chooses for its own batch)."""
        require(
            self.model.hf is None, "schedule.adaptive", True,
            "the adaptive choice prices the built-in GPT's layers per length; it is not there yet for a "
            "Hugging Face model (model.path): drop --adaptive or model.path",
        )
        require(
            self.model.dropout == 0, "model.dropout", self.model.dropout,
            "--adaptive may recompute, which dropout does not support yet; use 0 or drop --adaptive",
        )
        # The longest batch priced now where the partition is known without the layers: a batch
        # no choice fits is refused before any process starts (else at set-up, on every rank).
        schedule = self.schedule.built
        bounds = job_bounds(self.partition, schedule.num_stages, self.model)
        if bounds is not None and len(bounds) == schedule.num_stages + 1:
            chooser = gpt_chooser(
                self.model, self.schedule, self.compute_precision, bounds=bounds,
                placement=schedule.placement,
                device_type="cpu",
            )
            bucketed = self.data.bucket_by_length
            chooser.ranked(*longest_batch(self.schedule, self.batch_size, self.model.seq_len, bucketed))

    def _check_asynchronous(self) -> None:
        """What needs the whole step's gradient before the update: refused where the schedule
        updates weights inside the step."""
        name = self.schedule.name
        require(
            not (self.schedule.streaming and self.data.bucket_by_length),
            "data.bucket_by_length",
            self.data.bucket_by_length,
            "a stream (schedule.streaming) runs every step on one batch shape; drop --bucket-by-length "
            "or --streaming",
        )
        clip = self.optimizer.clip_grad_norm
        require(
            clip in (0, CLIP_AUTO),
            "optimizer.clip_grad_norm",
            clip,
            f"schedule {name!r} updates weights inside the step, before a global norm exists; "
            f'set optimizer.clip_grad_norm=0 (or "{CLIP_AUTO}", off for such schedules) or use a flush '
            "schedule",
        )
        require(
            self.grad_accumulation == 1,
            "grad_accumulation",
            self.grad_accumulation,
            f"schedule {name!r} updates weights inside the step; set grad_accumulation=1 or use a "
            "flush schedule",
        )

    def _check_retune(self, weight_update: str) -> None:
        s = self.schedule
        require(
            weight_update == "flush",
            "schedule.retune_every",
            s.retune_every,
            f"schedule {s.name!r} updates weights inside the step; re-tuning swaps flush schedules only "
            "(set schedule.retune_every=0)",
        )
        schedule = s.built
        num_virtual = schedule.num_stages // schedule.num_ranks
        require(
            layout_of(schedule.placement, schedule.num_ranks, num_virtual) is not None,
            "schedule.retune_every",
            s.retune_every,
            f"the stage placement {list(schedule.placement)} is none the search knows (contiguous, looped "
            "or V); use such a schedule or schedule.retune_every=0",
        )

    @property
    def clip_norm(self) -> float:
        """The norm the job clips the global gradient to; 0: no clipping. `optimizer.clip_grad_norm`,
        with "auto" resolved: DEFAULT_CLIP_NORM for flush schedules, 0 for asynchronous ones
        (they update weights inside the step, before a global norm exists)."""
        clip = self.optimizer.clip_grad_norm
        if isinstance(clip, str):
            return DEFAULT_CLIP_NORM if str(self.schedule.built.weight_update) == "flush" else 0.0
        return clip

    @property
    def schedule_label(self) -> str:
        """What runs, for messages: the family, or the file and the schedule it holds."""
        if self.schedule.file:
            return f"{self.schedule.file} ({self.schedule.built.name})"
        return self.schedule.name

    def _check_partition(self, num_stages: int, num_layers: int) -> None:
        value = self.partition
        if isinstance(value, tuple):
            require(
                len(value) == num_stages and all(count >= 1 for count in value) and sum(value) == num_layers,
                "partition",
                list(value),
                f"give {num_stages} per-stage layer counts, each >= 1, summing to the model's "
                f"{num_layers} layers (got {len(value)} counts summing to {sum(value)})",
            )
            return
        if value.startswith("type:"):
            try:
                re.compile(value[len("type:") :])
            except re.error as error:
                raise ConfigError(f"partition={value!r} is not allowed: bad regex ({error})") from None
            return
        require(
            value in PARTITION_METHODS,
            "partition",
            value,
            f"use one of {', '.join(PARTITION_METHODS)}, 'type:<regex>' or a list of per-stage layer counts",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data, in the TOML layout (for the run summary)."""
        data = dataclasses.asdict(self)
        for key in ("partition", "recompute"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data


# -- building from plain data --------------------------------------------------------------------

_SECTIONS: dict[str, type[Any]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "schedule": ScheduleConfig,
    "optimizer": OptimizerConfig,
}


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    schedule_file: Schedule | None = None,
) -> TrainConfig:
    """Defaults, then the TOML file at `path`, then `overrides` ({"schedule.ranks": 4, "steps": 10}).
    `schedule_file`: the contents of schedule.file where the caller has read it already."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {str(file)!r} does not exist; check --config") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {str(file)!r} is not valid TOML: {error}") from None
    for key, value in (overrides or {}).items():
        apply_override(data, key, value, _SECTIONS)
    extra = {ScheduleConfig: {"loaded": schedule_file}} if schedule_file is not None else {}
    config: TrainConfig = build_fields(TrainConfig, data, "", _SECTIONS, extra)
    return config
