"""Typed, validated configuration of the main job (`pipefold train`).

A `TrainConfig` is built from defaults, then a TOML file, then command-line
overrides (`load_config`), and is checked as a whole on construction: every field's
type and range, and the combinations (the schedule is built with
`pipefold.schedule.build`, which is torch-free and fast, so an illegal
ranks/micro-batches/virtual combination is refused before any process starts).
Every refusal is a `ConfigError` naming the field (dotted, as in the TOML file),
the value and a fix.

TOML layout (every key optional; these are the defaults)::

    steps = 300
    batch_size = 32
    seed = 0
    partition = "uniform"      # or a list of per-stage layer counts, e.g. [3, 5]
    recompute = "none"         # "full", or a list of layer indices
    out = ""                   # "" = runs/<timestamp>
    timeout_s = 60.0
    device = "auto"            # "cpu", "cuda"
    sample_tokens = 300
    checkpoint_every = 0       # also save every N steps into <out>/checkpoint (0 = only at the end)
    resume = ""                # a checkpoint directory to continue from ("" = start fresh)

    [model]
    d_model = 128
    num_heads = 4
    num_layers = 4
    seq_len = 128
    tie_embeddings = true      # false for pipedream / pipedream-2bw

    [data]
    max_bytes = 4000000
    val_fraction = 0.1

    [schedule]
    name = "1f1b"
    ranks = 2
    microbatches = 8
    virtual = 0                # 0 = the family's default
    data_parallel = 1          # replicas of the pipeline; processes = ranks x data_parallel x tensor_parallel
    tensor_parallel = 1        # each block's heads and MLP split over this many ranks per stage ("tp")
    sequence_parallel = false  # with tensor_parallel > 1: also split norms and boundaries by position
    file = ""                  # a schedule JSON to run instead of `name` (e.g. a found one)
    retune_every = 0           # re-search the order from the run's measured costs every N steps

    [optimizer]
    lr = 3e-3
    weight_decay = 0.1
    beta1 = 0.9
    beta2 = 0.95
    warmup_steps = 20
    zero = false               # shard AdamW's state over the data-parallel replicas (ZeRO-1)

No torch import.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipefold.errors import ConfigError, ScheduleError
from pipefold.parallel_config import ParallelConfig
from pipefold.schedule.auto import layout_of
from pipefold.schedule.probe import SEARCHED, probe_base

if typing.TYPE_CHECKING:
    from pipefold.schedule import Schedule
    from pipefold.schedule.auto import Placement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no tomllib; tomli is the same parser under its PyPI name.
    import tomli as tomllib

__all__ = [
    "ModelConfig",
    "DataConfig",
    "ScheduleConfig",
    "OptimizerConfig",
    "TrainConfig",
    "PARTITION_METHODS",
    "NUM_EXTRA_LAYERS",
    "load_config",
    "parse_override",
]

PARTITION_METHODS = ("uniform", "parameters", "profile")
"""Named partition methods; "type:<regex>" and explicit per-stage counts are accepted too."""

NUM_EXTRA_LAYERS = 4
"""Layers of the built-in GPT besides its blocks: embedding, positions, final norm, head."""


PARALLEL_NAMES = {
    "pp": "schedule.ranks",
    "dp": "schedule.data_parallel",
    "tp": "schedule.tensor_parallel",
    "num_microbatches": "schedule.microbatches",
    "num_virtual": "schedule.virtual",
    "schedule": "schedule.name",
    "sequence_parallel": "schedule.sequence_parallel",
    "zero": "optimizer.zero",
    "tied_layers": "model.tie_embeddings",
    "num_heads": "model.num_heads",
    "seq_len": "model.seq_len",
}
"""How this file spells the rulebook's fields (`ParallelConfig.check`)."""


def _require(ok: bool, field_path: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{field_path}={value!r} is not allowed: {fix}")


@dataclass(frozen=True)
class ModelConfig:
    """The built-in GPT (`pipefold.model.zoo.gpt_layers`); vocabulary: 256 byte values."""

    SECTION: ClassVar[str] = "model"

    d_model: int = 128
    """Width of the residual stream."""
    num_heads: int = 4
    """Attention heads; must divide d_model."""
    num_layers: int = 4
    """Decoder blocks. The layer list has num_layers + 4 entries (see NUM_EXTRA_LAYERS)."""
    seq_len: int = 128
    """Context length in bytes."""
    tie_embeddings: bool = True
    """Head shares the token embedding; asynchronous schedules (pipedream*) need false."""

    def __post_init__(self) -> None:
        for name in ("d_model", "num_heads", "num_layers"):
            value = getattr(self, name)
            _require(value >= 1, f"model.{name}", value, "use a positive integer")
        _require(self.seq_len >= 2, "model.seq_len", self.seq_len, "use at least 2 (e.g. 128)")
        _require(
            self.d_model % self.num_heads == 0,
            "model.num_heads",
            self.num_heads,
            f"it must divide model.d_model={self.d_model} (e.g. num_heads=4 for d_model=128)",
        )

    @property
    def num_model_layers(self) -> int:
        return self.num_layers + NUM_EXTRA_LAYERS


@dataclass(frozen=True)
class DataConfig:
    """The built-in corpus (`pipefold.data.load_corpus`)."""

    SECTION: ClassVar[str] = "data"

    max_bytes: int = 4_000_000
    """Bytes of stdlib source read, in sorted file order."""
    val_fraction: float = 0.1
    """Share of the bytes held out for validation (the tail)."""

    def __post_init__(self) -> None:
        _require(self.max_bytes >= 1024, "data.max_bytes", self.max_bytes, "use at least 1024 bytes")
        _require(
            0.0 < self.val_fraction < 1.0,
            "data.val_fraction",
            self.val_fraction,
            "use a fraction strictly between 0 and 1 (e.g. 0.1)",
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
    embeddings, the final norm and the head stay whole."""
    sequence_parallel: bool = False
    """With tensor_parallel > 1, Megatron's sequence parallelism: from the position embedding to
    the final norm every tp rank holds model.seq_len / tensor_parallel positions, so the norms
    run on a tp rank's positions only and stage boundaries carry 1/tensor_parallel of the
    residual stream (pipefold/runtime/parallel/sequence_parallel.py). model.seq_len must divide by
    tensor_parallel."""
    microbatches: int = 8
    """Micro-batches per step."""
    virtual: int = 0
    """Stages per rank for interleaved / V schedules; 0 = the family's default."""
    file: str = ""
    """A schedule JSON (pipefold.schedule.io, e.g. from `pipefold schedules find --save`) run
    instead of the family `name`; its ranks and micro-batches must match `ranks` and `microbatches`."""
    retune_every: int = 0
    """Every this many steps, search an order for the costs the run measured in its latest steps
    and switch to it where its predicted step is at least 2% shorter (same stages,
    `Pipeline.use_schedule`); 0: never. Flush schedules on a layout the search knows."""

    def __post_init__(self) -> None:
        self.parallel().check(PARALLEL_NAMES)
        _require(
            self.retune_every >= 0, "schedule.retune_every", self.retune_every, "use 0 (never) or steps"
        )
        if self.name in SEARCHED:
            wanted = SEARCHED[self.name][1]
            _require(
                self.virtual in (0, wanted),
                "schedule.virtual",
                self.virtual,
                f"schedule.name={self.name!r} searches with {wanted} stage(s) per rank; use 0 or {wanted}",
            )

    def parallel(self, **known: Any) -> ParallelConfig:
        """This section as the rulebook's `ParallelConfig`; `known` adds what other sections say."""
        return ParallelConfig(
            pp=self.ranks,
            dp=self.data_parallel,
            tp=self.tensor_parallel,
            num_microbatches=self.microbatches,
            num_virtual=self.virtual or None,
            schedule=self.name,
            sequence_parallel=self.sequence_parallel,
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

    def family_schedule(self) -> Schedule:
        """The family `name` built for these ranks and micro-batches. For "auto" / "auto-v" it is
        the layout's probe family, which stands in until the search has run on the ranks: the
        searched schedule has its stages, placement and flush update. Raises ScheduleError."""
        placement = self.searched_placement
        if placement is not None:
            return probe_base(
                placement,
                num_ranks=self.ranks,
                num_microbatches=self.microbatches,
                num_virtual=SEARCHED[self.name][1],
            )
        from pipefold.schedule import build

        return build(
            self.name, num_ranks=self.ranks, num_microbatches=self.microbatches, num_virtual=self.num_virtual
        )

    @property
    def num_processes(self) -> int:
        return self.ranks * self.data_parallel * self.tensor_parallel


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up, then constant."""

    SECTION: ClassVar[str] = "optimizer"

    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    """Steps of linear warm-up from lr / warmup_steps to lr."""
    zero: bool = False
    """Shard AdamW's state over the data-parallel replicas (ZeRO stage 1,
    `pipefold.runtime.sharded_optimizer`): each replica keeps and updates 1 / data_parallel of it."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", self.lr, "use a positive learning rate (e.g. 3e-3)")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "use >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"optimizer.{name}", value, "use a value in [0, 1)")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, "use >= 0")


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
    """Sequences per step, split into schedule.microbatches micro-batches (unevenly if need be)."""
    seed: int = 0
    """Seeds the weights (per layer, independent of the partition) and the batch order."""
    partition: str | tuple[int, ...] = "uniform"
    """"uniform", "parameters", "profile", "type:<regex>", or per-stage layer counts."""
    recompute: str | tuple[int, ...] = "none"
    """"none", "full" (keep stage inputs, recompute in backward), or layer indices to recompute."""
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

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", self.steps, "use at least 1 step")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "use at least 1")
        _require(self.timeout_s > 0, "timeout_s", self.timeout_s, "use a positive number of seconds")
        _require(self.sample_tokens >= 0, "sample_tokens", self.sample_tokens, "use >= 0")
        _require(
            self.checkpoint_every >= 0,
            "checkpoint_every",
            self.checkpoint_every,
            "use a number of steps >= 1, or 0 to save only at the end",
        )
        _require(
            self.device in ("auto", "cpu", "cuda"), "device", self.device, 'use "auto", "cpu" or "cuda"'
        )
        dp = self.schedule.data_parallel
        _require(
            self.batch_size % dp == 0,
            "batch_size",
            self.batch_size,
            f"schedule.data_parallel={dp} replicas each take an equal shard of the batch; use a "
            f"multiple of {dp} (e.g. {dp * max(1, round(self.batch_size / dp))})",
        )
        _require(
            self.batch_size // dp >= self.schedule.microbatches,
            "batch_size",
            self.batch_size,
            f"every one of schedule.microbatches={self.schedule.microbatches} micro-batches needs at "
            f"least one sequence per replica; use batch_size >= {self.schedule.microbatches * dp} "
            "or fewer micro-batches",
        )
        num_stages, weight_update = self._check_schedule()
        if self.schedule.retune_every:
            self._check_retune(weight_update)
        num_layers = self.model.num_model_layers
        self.schedule.parallel(
            weight_update=weight_update,
            recompute=self.recompute,
            zero=self.optimizer.zero,
            tied_layers=self.model.tie_embeddings,
            num_layers=num_layers,
            num_heads=self.model.num_heads,
            seq_len=self.model.seq_len,
        ).check(PARALLEL_NAMES)
        _require(
            num_layers >= num_stages,
            "model.num_layers",
            self.model.num_layers,
            f"the GPT has {num_layers} layers (num_layers + {NUM_EXTRA_LAYERS}) but the schedule has "
            f"{num_stages} stages and each needs one; use model.num_layers >= "
            f"{num_stages - NUM_EXTRA_LAYERS} or fewer ranks / virtual stages",
        )
        self._check_partition(num_stages, num_layers)

    def _check_retune(self, weight_update: str) -> None:
        s = self.schedule
        _require(
            weight_update == "flush",
            "schedule.retune_every",
            s.retune_every,
            f"schedule {s.name!r} updates weights inside the step; re-tuning swaps flush schedules only "
            "(set schedule.retune_every=0)",
        )
        schedule = load_schedule_file(s.file) if s.file else s.family_schedule()
        num_virtual = schedule.num_stages // schedule.num_ranks
        _require(
            layout_of(schedule.placement, schedule.num_ranks, num_virtual) is not None,
            "schedule.retune_every",
            s.retune_every,
            f"the stage placement {list(schedule.placement)} is none the search knows (contiguous, looped "
            "or V); use such a schedule or schedule.retune_every=0",
        )

    def _check_schedule(self) -> tuple[int, str]:
        """(num_stages, weight update mode) of the schedule, built (or loaded) to prove it legal."""
        s = self.schedule
        if s.file:
            loaded = load_schedule_file(s.file)
            for key, wanted, found in (
                ("schedule.ranks", s.ranks, loaded.num_ranks),
                ("schedule.microbatches", s.microbatches, loaded.num_microbatches),
            ):
                _require(
                    wanted == found,
                    key,
                    wanted,
                    f"schedule.file={s.file!r} is a schedule for {found}; set {key}={found} "
                    "(pipefold train --schedule-file fills both from the file)",
                )
            return loaded.num_stages, str(loaded.weight_update)
        try:
            built = s.family_schedule()
        except ScheduleError as error:
            raise ConfigError(
                f"schedule.name={s.name!r} with schedule.ranks={s.ranks}, "
                f"schedule.microbatches={s.microbatches}, schedule.virtual={s.virtual} is not legal: {error}"
            ) from None
        return built.num_stages, str(built.weight_update)

    @property
    def schedule_label(self) -> str:
        """What runs, for messages: the family, or the file and the schedule it holds."""
        if self.schedule.file:
            return f"{self.schedule.file} ({load_schedule_file(self.schedule.file).name})"
        return self.schedule.name

    def _check_partition(self, num_stages: int, num_layers: int) -> None:
        value = self.partition
        if isinstance(value, tuple):
            _require(
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
        _require(
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


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint; ints are accepted for floats, lists for tuples."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
                return tuple(value)
    names = " or ".join(
        "a list of integers" if typing.get_origin(option) is tuple else option.__name__ for option in options
    )
    raise ConfigError(f"{path}={value!r} has the wrong type: expected {names}")


def _build(cls: type[Any], data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} in {where}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in _SECTIONS and not prefix:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name}={value!r} must be a table ([{name}] in TOML)")
            kwargs[name] = _build(_SECTIONS[name], value, f"{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, value, hints[name])
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """ "schedule.ranks=4" -> ("schedule.ranks", 4); values are read as TOML, else as a bare string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE; write e.g. schedule.ranks=4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def _apply(data: dict[str, Any], key: str, value: Any) -> None:
    section, dot, name = key.partition(".")
    if not dot:
        data[key] = value
        return
    if section not in _SECTIONS:
        raise ConfigError(f"unknown section in override {key!r}; sections: {', '.join(_SECTIONS)}")
    table = data.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{section}={table!r} must be a table ([{section}] in TOML)")
    table[name] = value


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the TOML file at `path`, then `overrides` ({"schedule.ranks": 4, "steps": 10})."""
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
        _apply(data, key, value)
    config: TrainConfig = _build(TrainConfig, data, "")
    return config


def load_schedule_file(path: str) -> Any:
    """The validated `Schedule` in `path`, or a ConfigError naming `schedule.file`."""
    from pipefold.schedule.io import load

    try:
        return load(path)
    except OSError as error:
        raise ConfigError(
            f"schedule.file={path!r} cannot be read ({error.strerror}); give a schedule JSON written by "
            "`pipefold schedules find --save` or pipefold.schedule.io.save"
        ) from None
    except (ScheduleError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"schedule.file={path!r} is not a valid pipefold schedule: {error}") from None
