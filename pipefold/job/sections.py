"""The `[model]`, `[data]`, `[schedule]` and `[optimizer]` tables of `pipefold train`'s
configuration: one frozen dataclass each, checked on construction (torch-free).

`pipefold.job.config.TrainConfig` holds one of each and checks what spans them; every
refusal is a `ConfigError` naming the dotted field, the value and a fix.
"""

from __future__ import annotations

import math
import typing
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, ClassVar

from pipefold.errors import ConfigError, ScheduleError
from pipefold.hf.files import ModelFiles, inspect_model
from pipefold.parallel_config import ParallelConfig
from pipefold.plan.probe import SEARCHED, probe_base
from pipefold.plan.units import parse_bytes
from pipefold.schedule import STREAMING_FAMILIES, Schedule, build
from pipefold.schedule.io import load

if typing.TYPE_CHECKING:
    from pipefold.schedule.placement import Placement

ATTENTION_CHOICES = ("fused", "unfused")
"""`model.attention`: pipefold.model.zoo.gpt.ATTENTION_CHOICES, here without torch."""

__all__ = [
    "ATTENTION_CHOICES",
    "ModelConfig",
    "DataConfig",
    "ScheduleConfig",
    "OptimizerConfig",
    "LR_SCHEDULES",
    "CLIP_AUTO",
    "DEFAULT_CLIP_NORM",
    "NUM_EXTRA_LAYERS",
    "PARALLEL_NAMES",
    "load_schedule_file",
    "require",
]

BYTE_VOCAB_SIZE = 256
"""The built-in GPT's vocabulary (`pipefold.data.VOCAB_SIZE`, written here so the configuration
stays torch-free; a test checks they agree)."""

NUM_EXTRA_LAYERS = 4
"""Layers of the built-in GPT besides its blocks: embedding, positions, final norm, head."""

LR_SCHEDULES = ("constant", "cosine", "linear")
"""What follows the warm-up (pipefold.job.optim): the peak lr, or a cosine / linear decay to min_lr."""

CLIP_AUTO = "auto"
"""`optimizer.clip_grad_norm`'s default: DEFAULT_CLIP_NORM where the schedule flushes, else off."""

DEFAULT_CLIP_NORM = 1.0
"""The customary global-norm clip (GPT-2, Megatron, torchtitan) the job applies by default."""

PARALLEL_NAMES = {
    "pp": "schedule.ranks",
    "dp": "schedule.data_parallel",
    "tp": "schedule.tensor_parallel",
    "num_microbatches": "schedule.num_microbatches",
    "num_virtual": "schedule.virtual",
    "schedule": "schedule.name",
    "sequence_parallel": "schedule.sequence_parallel",
    "vocab_parallel": "schedule.vocab_parallel",
    "vocab_size": "model.vocab_size",
    "zero": "optimizer.zero",
    "shard": "schedule.shard",
    "precision": "precision",
    "tied_layers": "model.tie_embeddings",
    "num_heads": "model.num_heads",
    "seq_len": "model.seq_len",
    "on_nonfinite": "on_nonfinite",
    "compile": "compile",
    "adaptive": "schedule.adaptive",
}
"""How the TOML file spells the rulebook's fields (`ParallelConfig.check`)."""


def require(ok: bool, field_path: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{field_path}={value!r} is not allowed: {fix}")


@dataclass(frozen=True)
class ModelConfig:
    """The built-in GPT (`pipefold.model.zoo.gpt_layers`; vocabulary: 256 byte values), or a
    Hugging Face causal LM (`path`)."""

    SECTION: ClassVar[str] = "model"

    path: str = ""
    """A Hugging Face model directory (config.json + safetensors) or a config.json (random
    initialization), trained instead of the built-in GPT; d_model, num_heads, num_layers and
    tie_embeddings are then the model's own (docs/huggingface.md)."""
    d_model: int = 128
    """Width of the residual stream."""
    num_heads: int = 4
    """Attention heads; must divide d_model."""
    num_layers: int = 4
    """Decoder blocks. The layer list has num_layers + 4 entries (see NUM_EXTRA_LAYERS)."""
    seq_len: int = 128
    """Context length in tokens (bytes for the built-in GPT)."""
    tie_embeddings: bool = True
    """Head shares the token embedding (asynchronous schedules sum its gradient at every update)."""
    dropout: float = 0.0
    """Dropout probability of the built-in GPT while training (0 = none): the blocks' residual
    dropout with fused attention, whose random state is saved with each checkpoint, so a resumed
    run stays identical; with `attention = "unfused"` Megatron-LM's dropouts, seeded per (seed,
    step, micro-batch, layer, site) (pipefold.model.dropout)."""
    attention: str = "fused"
    """The built-in GPT's attention: "fused" (torch's scaled-dot-product attention, no s^2
    scores kept) or "unfused" (Megatron-LM's: QK^T scores, softmax and dropout on the
    probabilities kept for the backward, dropout after the projection, the MLP and the
    embeddings; what `pipefold plan --megatron` prices)."""

    def __post_init__(self) -> None:
        for name in ("d_model", "num_heads", "num_layers"):
            value = getattr(self, name)
            require(value >= 1, f"model.{name}", value, "use a positive integer")
        require(self.seq_len >= 2, "model.seq_len", self.seq_len, "use at least 2 (e.g. 128)")
        require(
            self.d_model % self.num_heads == 0,
            "model.num_heads",
            self.num_heads,
            f"it must divide model.d_model={self.d_model} (e.g. num_heads=4 for d_model=128)",
        )
        require(
            0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "use a probability in [0, 1), e.g. 0.1"
        )
        require(
            self.attention in ATTENTION_CHOICES, "model.attention", self.attention,
            "use " + " or ".join(f'"{choice}"' for choice in ATTENTION_CHOICES),
        )
        require(
            not (self.path and self.attention != "fused"), "model.attention", self.attention,
            "it applies to the built-in GPT only; a Hugging Face model (model.path) keeps its own attention",
        )
        require(
            not (self.path and self.dropout > 0), "model.dropout", self.dropout,
            "it applies to the built-in GPT only; a Hugging Face model (model.path) keeps its own dropout",
        )
        if self.path:
            # Read (config.json, the weight index) without torch; kept, not a field.
            object.__setattr__(self, "_hf", inspect_model(self.path, field="model.path"))

    @property
    def hf(self) -> ModelFiles | None:
        """The Hugging Face model's files where `path` is set; None for the built-in GPT."""
        files: ModelFiles | None = self.__dict__.get("_hf")
        return files

    @property
    def num_model_layers(self) -> int:
        """Pipeline layers: the GPT's blocks + NUM_EXTRA_LAYERS, or an HF model's blocks + 2."""
        if self.hf is not None:
            return self.hf.num_pipeline_layers
        return self.num_layers + NUM_EXTRA_LAYERS

    @property
    def tied(self) -> bool:
        """Whether the head shares the input embedding's weight."""
        return self.hf.tie_word_embeddings if self.hf is not None else self.tie_embeddings

    @property
    def heads(self) -> int:
        return self.hf.num_heads if self.hf is not None else self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf.vocab_size if self.hf is not None else BYTE_VOCAB_SIZE


@dataclass(frozen=True)
class DataConfig:
    """The built-in corpus (`pipefold.data.load_corpus`), or for a Hugging Face model a text
    file, directory or token file (`pipefold.data.tokens`)."""

    SECTION: ClassVar[str] = "data"

    path: str = ""
    """A text file or directory (tokenized with model.path's tokenizer) or a token file
    (<name>.bin: a flat array of ids, as nanoGPT writes); "" = the built-in corpus (for a
    Hugging Face model, tokenized with its tokenizer). Needs model.path."""
    token_dtype: str = "auto"
    """A token file's id width: "uint16", "uint32", or "auto" (uint16 when the model's
    vocabulary fits in it)."""
    max_bytes: int = 4_000_000
    """Bytes of stdlib source read, in sorted file order."""
    val_fraction: float = 0.1
    """Share of the bytes held out for validation (the tail)."""
    bucket_by_length: bool = False
    """Batches of corpus lines of similar length instead of fixed windows: each step one bucket
    length (bucket_min_len, doubled, ..., model.seq_len) and batch_size x model.seq_len tokens at
    most, none padded (`pipefold.data.LengthBuckets`). Built-in corpus only."""
    bucket_min_len: int = 8
    """The shortest bucket; a line's tail shorter than it is dropped."""

    def __post_init__(self) -> None:
        require(
            self.bucket_min_len >= 1, "data.bucket_min_len", self.bucket_min_len, "use at least 1 (e.g. 8)"
        )
        require(self.max_bytes >= 1024, "data.max_bytes", self.max_bytes, "use at least 1024 bytes")
        require(
            0.0 < self.val_fraction < 1.0,
            "data.val_fraction",
            self.val_fraction,
            "use a fraction strictly between 0 and 1 (e.g. 0.1)",
        )
        require(
            self.token_dtype in ("auto", "uint16", "uint32"),
            "data.token_dtype",
            self.token_dtype,
            'use "auto", "uint16" or "uint32"',
        )
        require(
            not self.path or Path(self.path).exists(),
            "data.path",
            self.path,
            "no such file or directory; give a text file, a directory of text files or a token file "
            "<name>.bin",
        )


@dataclass(frozen=True)
class ScheduleConfig:
    """Which pipeline schedule runs; names as `pipefold schedules` lists them."""

    SECTION: ClassVar[str] = "schedule"

    name: str = "1f1b"
    """Schedule family (pipefold.schedule.names()), or "auto" / "auto-v": a schedule searched from
    costs measured in probe steps on the ranks (pipefold.runtime.tune_schedule), on the contiguous
    or the V layout."""
    ranks: int = 2
    """Pipeline ranks (stages' processes) per replica."""
    data_parallel: int = 1
    """Replicas of the pipeline along a "dp" mesh dimension; processes = ranks x data_parallel x
    tensor_parallel."""
    tensor_parallel: int = 1
    """Ranks per stage along a "tp" mesh dimension: each decoder block's attention (by heads)
    and MLP are split over them (Megatron's split; it must divide model.num_heads); the
    embeddings, the final norm and the head stay whole (see vocab_parallel)."""
    sequence_parallel: bool = False
    """With tensor_parallel > 1, Megatron's sequence parallelism: from the position embedding to
    the final norm every tp rank holds model.seq_len / tensor_parallel positions, so the norms
    run on a tp rank's positions only and stage boundaries carry 1/tensor_parallel of the
    residual stream (pipefold/runtime/parallel/sequence_parallel.py). model.seq_len must divide by
    tensor_parallel."""
    vocab_parallel: bool = False
    """With tensor_parallel > 1, Megatron's vocabulary-parallel embedding and output head: each
    tp rank holds 1/tensor_parallel of the token table's rows (tied or not) and of the logits,
    and the loss is the vocabulary-parallel cross-entropy (runtime/parallel/vocab_parallel.py).
    The built-in GPT only; its 256-value vocabulary must divide by tensor_parallel."""
    shard: str = "replicate"
    """What the data-parallel replicas shard: "replicate" (nothing), "zero1" (AdamW's state, as
    optimizer.zero) or "full" (each stage's weights, gradients and AdamW state, FSDP2, gathered
    once per step before the stage's first forward and freed after its last backward;
    docs/parallelism.md, "Full sharding"). Needs data_parallel > 1."""
    free_between_microbatches: bool = False
    """With shard = "full": free a stage's gathered weights whenever its rank turns to another of
    its stages (interleaved, V) and gather them again before the stage's next action."""
    gather_lookahead: int = 0
    """With shard = "full": start each weight gather this many actions of the rank's program before
    the action that needs it, so it overlaps that compute (0: right before it)."""
    num_microbatches: int = 8
    """Micro-batches per step (flag: --microbatches)."""
    virtual: int = 0
    """Stages per rank for interleaved / V schedules; 0 = the family's default."""
    file: str = ""
    """A schedule JSON (pipefold.schedule.io, e.g. from `pipefold schedules find --save`) run
    instead of the family `name`; its ranks and micro-batches must match `ranks` and `num_microbatches`."""
    retune_every: int = 0
    """Every this many steps, search an order for the costs the run measured in its latest steps
    and switch to it where its predicted step is at least 2% shorter (same stages,
    `Pipeline.use_schedule`); 0: never. Flush schedules on a layout the search knows."""
    streaming: bool = False
    """Run consecutive steps as streams (`Pipeline.train`): step k+1's forwards enter while step
    k's backwards drain, and the pipeline fills and drains once per stream (before a checkpoint,
    an evaluation, the end, or every 50 steps) instead of once per step. pipedream and
    pipedream-2bw only (pipefold/job/streaming.py, docs/schedules.md)."""
    adaptive: bool = False
    """Run each batch with the micro-batch count (a divisor of num_microbatches), the flush family
    of this schedule's stage placement and the recomputation the cost model chooses for its
    length, within memory_limit, re-checked against measured steps (flag: --adaptive;
    pipefold.plan.adaptive, docs/schedules.md, "Adaptive choice per batch")."""
    memory_limit: str = ""
    """Bytes each rank may use for the adaptive choice, e.g. "2GiB" (the planner's memory model);
    "" = no limit (then nothing is recomputed)."""
    loaded: InitVar[Schedule | None] = None
    """The contents of `file` where the caller has read it already (the CLI does, to fill ranks
    and micro-batches from it), so it is read once; not a setting."""

    def __post_init__(self, loaded: Schedule | None) -> None:
        self.parallel().check(PARALLEL_NAMES)
        require(
            isinstance(self.gather_lookahead, int) and not isinstance(self.gather_lookahead, bool)
            and self.gather_lookahead >= 0,
            "schedule.gather_lookahead", self.gather_lookahead,
            "give an integer >= 0 (0: gather right before use)",
        )
        for field_name, value, default in (
            ("free_between_microbatches", self.free_between_microbatches, False),
            ("gather_lookahead", self.gather_lookahead, 0),
        ):
            require(
                value == default or self.shard == "full",
                f"schedule.{field_name}", value,
                f"it places full sharding's weight gathers; set schedule.shard='full' "
                f"or leave it at {default!r}",
            )
        require(
            self.retune_every >= 0, "schedule.retune_every", self.retune_every, "use 0 (never) or steps"
        )
        require(
            not self.streaming or (self.name in STREAMING_FAMILIES and not self.file),
            "schedule.streaming",
            self.streaming,
            f"schedule.name={self.name!r}{' with schedule.file' if self.file else ''} cannot stream: only "
            f"the asynchronous families {', '.join(STREAMING_FAMILIES)} overlap their steps (a flush "
            "schedule drains before every update); use --schedule pipedream or pipedream-2bw, or drop "
            "--streaming",
        )
        if self.adaptive or self.memory_limit:
            self._check_adaptive()
        if self.name in SEARCHED:
            wanted = SEARCHED[self.name][1]
            require(
                self.virtual in (0, wanted),
                "schedule.virtual",
                self.virtual,
                f"schedule.name={self.name!r} searches with {wanted} stage(s) per rank; use 0 or {wanted}",
            )
        # Not a field: equality, to_dict and summary.json see the settings only.
        object.__setattr__(self, "_built", self._build_schedule(loaded))

    @property
    def memory_limit_bytes(self) -> float:
        """`memory_limit` in bytes; inf where it is empty."""
        return parse_bytes(self.memory_limit) if self.memory_limit else math.inf

    def _check_adaptive(self) -> None:
        require(
            self.adaptive, "schedule.memory_limit", self.memory_limit,
            "it bounds the adaptive choice per batch; add --adaptive (schedule.adaptive = true) or drop it",
        )
        try:
            limit = self.memory_limit_bytes
        except ConfigError as error:
            raise ConfigError(
                f"schedule.memory_limit={self.memory_limit!r} is not allowed: {error}"
            ) from None
        require(limit > 0, "schedule.memory_limit", self.memory_limit, 'use a size such as "2GiB"')
        fix = "while --adaptive chooses per batch; use a family or drop --adaptive"
        one = "has one micro-batch count"
        require(self.name not in SEARCHED, "schedule.name", self.name, f"a searched order {one}, {fix}")
        require(not self.file, "schedule.file", self.file, f"a schedule file {one}, {fix}")
        retune = self.retune_every
        require(retune == 0, "schedule.retune_every", retune, f"re-tuning changes the order, {fix}")

    def parallel(self, **known: Any) -> ParallelConfig:
        """This section as the rulebook's `ParallelConfig`; `known` adds what other sections say."""
        return ParallelConfig(
            pp=self.ranks,
            dp=self.data_parallel,
            tp=self.tensor_parallel,
            num_microbatches=self.num_microbatches,
            num_virtual=self.virtual or None,
            schedule=self.name,
            sequence_parallel=self.sequence_parallel,
            vocab_parallel=self.vocab_parallel,
            shard=self.shard,
            adaptive=self.adaptive,
            **known,
        )

    @property
    def num_virtual(self) -> int | None:
        if self.name in SEARCHED and not self.file:
            return SEARCHED[self.name][1]
        return self.virtual or None

    @property
    def searched_placement(self) -> Placement | None:
        """The layout to search a schedule on ("auto", "auto-v"); None for a family or a file."""
        return None if self.file or self.name not in SEARCHED else SEARCHED[self.name][0]

    @property
    def built(self) -> Schedule:
        """The schedule these settings ask for, built (or read from `file`) once, on construction.
        For "auto" / "auto-v" it is the layout's probe family, which stands in until the search
        has run on the ranks: the searched schedule has its stages, placement and flush update."""
        schedule: Schedule = self.__dict__["_built"]
        return schedule

    def _build_schedule(self, loaded: Schedule | None) -> Schedule:
        if self.file:
            schedule = loaded if loaded is not None else load_schedule_file(self.file)
            for key, wanted, found in (
                ("schedule.ranks", self.ranks, schedule.num_ranks),
                ("schedule.num_microbatches", self.num_microbatches, schedule.num_microbatches),
            ):
                require(
                    wanted == found,
                    key,
                    wanted,
                    f"schedule.file={self.file!r} is a schedule for {found}; set {key}={found} "
                    "(pipefold train --schedule-file fills both from the file)",
                )
            return schedule
        try:
            placement = self.searched_placement
            if placement is not None:
                return probe_base(
                    placement,
                    num_ranks=self.ranks,
                    num_microbatches=self.num_microbatches,
                    num_virtual=SEARCHED[self.name][1],
                )
            return build(
                self.name,
                num_ranks=self.ranks,
                num_microbatches=self.num_microbatches,
                num_virtual=self.num_virtual,
            )
        except ScheduleError as error:
            raise ConfigError(
                f"schedule.name={self.name!r} with schedule.ranks={self.ranks}, "
                f"schedule.num_microbatches={self.num_microbatches}, schedule.virtual={self.virtual} "
                f"is not legal: {error}"
            ) from None

    @property
    def num_processes(self) -> int:
        return self.ranks * self.data_parallel * self.tensor_parallel


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a linear warm-up, then a constant or decaying lr (pipefold/job/optim.py)."""

    SECTION: ClassVar[str] = "optimizer"

    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    """Steps of linear warm-up from lr / warmup_steps to lr."""
    lr_schedule: str = "cosine"
    """After the warm-up: "constant" (lr), "cosine" or "linear" decay from lr to min_lr at the last step."""
    min_lr: float = 0.0
    """Where a decaying schedule ends; at most lr."""
    weight_decay_groups: bool = True
    """Exempt norms, biases and embeddings from weight decay (flush schedules; asynchronous ones
    decay every parameter); false decays every parameter."""
    clip_grad_norm: float | str = CLIP_AUTO
    """Clip the global gradient norm (over every stage, replica and tp shard) to this after each
    optimizer step's gradient is complete; 0 = no clipping. "auto" (the default): 1.0 where the
    schedule flushes, 0 where it updates weights inside the step (pipedream, pipedream-2bw),
    which cannot clip (`TrainConfig.clip_norm`). The norm is reported either way."""
    zero: bool = False
    """Shard AdamW's state over the data-parallel replicas (ZeRO stage 1,
    `pipefold.runtime.sharded_optimizer`): each replica keeps and updates 1 / data_parallel of it."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "optimizer.lr", self.lr, "use a positive learning rate (e.g. 3e-3)")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "use >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"optimizer.{name}", value, "use a value in [0, 1)")
        require(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "use >= 0")
        require(
            self.lr_schedule in LR_SCHEDULES,
            "optimizer.lr_schedule",
            self.lr_schedule,
            f"use one of {', '.join(LR_SCHEDULES)}",
        )
        require(
            0.0 <= self.min_lr <= self.lr,
            "optimizer.min_lr",
            self.min_lr,
            f"use a value in [0, optimizer.lr={self.lr}]",
        )
        clip = self.clip_grad_norm
        require(
            clip == CLIP_AUTO if isinstance(clip, str) else clip >= 0 and math.isfinite(clip),
            "optimizer.clip_grad_norm",
            clip,
            f'use a positive norm to clip to (e.g. 1.0), 0 for no clipping, or "{CLIP_AUTO}" '
            f"({DEFAULT_CLIP_NORM} for flush schedules, off for asynchronous ones)",
        )


def load_schedule_file(path: str) -> Schedule:
    """The validated `Schedule` in `path`, or a ConfigError naming `schedule.file`."""
    try:
        return load(path)
    except OSError as error:
        raise ConfigError(
            f"schedule.file={path!r} cannot be read ({error.strerror}); give a schedule JSON written by "
            "`pipefold schedules find --save` or pipefold.schedule.io.dumps"
        ) from None
    except (ScheduleError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"schedule.file={path!r} is not a valid pipefold schedule: {error}") from None
