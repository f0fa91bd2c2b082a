"""The rulebook: which parallel degrees, schedules and features combine, checked in one place.

    >>> from pipefold.parallel_config import ParallelConfig
    >>> ParallelConfig(pp=2, tp=2, schedule="pipedream", weight_update="stash").check()
    Traceback (most recent call last):
    ...
    pipefold.errors.ConfigError: tp=2 is not allowed: schedule='pipedream' updates weights inside ...

A `ParallelConfig` describes a configuration as plain values (no torch); `check()` raises
the first refusal as a `ConfigError` naming the field, its value and a fix. `pipefold train`'s
configuration (`pipefold.config`), `Pipeline` and `sharded_optimizer` all describe what they
were given and call `check`, passing `names`: how their user spells each field (e.g.
"schedule.data_parallel" in the TOML file), so a message speaks the caller's language.
Fields a caller does not know (`None`) skip the rules that need them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pipefold.errors import ConfigError

__all__ = ["ParallelConfig", "RECOMPUTE_MODES", "SHARD_MODES"]

SHARD_MODES = ("replicate", "zero1", "full")
"""What the data-parallel replicas may shard (`ParallelConfig.shard`)."""

RECOMPUTE_MODES = ("none", "full", "selective")
"""Named recomputation modes ("selective": the attention core of each transformer block); a list
of layer indices recomputes those layers only."""


@dataclass(frozen=True)
class ParallelConfig:
    """One parallel configuration: degrees, schedule and the features that interact with them."""

    pp: int = 1
    """Pipeline ranks (of one replica)."""
    dp: int = 1
    """Data-parallel replicas of the pipeline."""
    tp: int = 1
    """Tensor-parallel ranks per stage."""
    num_microbatches: int = 8
    """Micro-batches per step."""
    num_virtual: int | None = None
    """Stages per rank; None = the schedule family's default."""
    schedule: str = "1f1b"
    """The schedule's name, for messages."""
    weight_update: str | None = None
    """The schedule's `WeightUpdate` value ("flush" or an asynchronous mode); None = not known
    yet (the schedule is not built), which skips the rules about asynchronous schedules."""
    recompute: str | tuple[int, ...] = "none"
    """"none", "full", "selective" (attention cores only), or the indices of the layers to recompute."""
    on_nonfinite: str = "raise"
    """What a non-finite loss does: "raise", or "skip" the step."""
    sequence_parallel: bool = False
    """Megatron's sequence parallelism between tensor-parallel layers."""
    vocab_parallel: bool = False
    """The token embedding and output head split by vocabulary rows over the tensor-parallel
    ranks (Megatron's VocabParallelEmbedding)."""
    zero: bool = False
    """The optimizer state sharded over the data-parallel replicas (ZeRO-1)."""
    shard: str = "replicate"
    """What the replicas shard: "replicate" (nothing; `zero` may still shard the optimizer
    state), "zero1" (the same as `zero`) or "full" (weights, gradients and optimizer state,
    FSDP2 per stage)."""
    precision: str = "fp32"
    """The compute precision: "fp32", "bf16", "fp16" or "bf16-pure" (allowed with every layout)."""
    shared_parameters: bool = False
    """Whether some parameter is held by several layers (tied by sharing, not `TiedLayerSpec`)."""
    tied_layers: bool = False
    """Whether the model ties layers (one module at several places, `TiedLayerSpec`)."""
    num_layers: int | None = None
    """Layers of the model (bounds the recompute indices); None = unknown."""
    num_heads: int | None = None
    """Attention heads, which tensor parallelism splits; None = unknown (not checked)."""
    seq_len: int | None = None
    """Sequence length, which sequence parallelism splits; None = unknown (not checked)."""
    vocab_size: int | None = None
    """Vocabulary size, which vocabulary parallelism splits; None = unknown (not checked)."""
    compile: bool = False
    """Each layer runs through torch.compile."""
    adaptive: bool = False
    """Each batch runs with the micro-batches, flush family and recomputation the cost model
    chooses for its length (`pipefold.plan.adaptive`)."""

    @property
    def asynchronous(self) -> bool:
        """Whether the schedule updates weights inside the step (PipeDream's family)."""
        return self.weight_update is not None and self.weight_update != "flush"

    def check(self, names: Mapping[str, str] | None = None) -> None:
        """Raise a ConfigError for the first rule this configuration breaks. `names` maps a field
        to how the caller's user wrote it (default: the field's own name)."""
        _Rules(self, dict(names or {})).run()


class _Rules:
    """The refusals, each written once; `run` applies them in order."""

    def __init__(self, config: ParallelConfig, names: dict[str, str]) -> None:
        unknown = sorted(set(names) - {f.name for f in fields(ParallelConfig)})
        if unknown:
            raise ValueError(f"names for unknown ParallelConfig fields {unknown}")
        self.c = config
        self.names = names

    def name(self, field: str) -> str:
        return self.names.get(field, field)

    def refuse(self, field: str, fix: str) -> None:
        value: Any = getattr(self.c, field)
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{self.name(field)}={shown!r} is not allowed: {fix}")

    def run(self) -> None:
        self.degrees()
        self.recompute()
        self.asynchronous()
        self.zero()
        self.full_shard()
        self.tensor_parallel()
        self.adaptive()

    def degrees(self) -> None:
        c = self.c
        for field, what in (("pp", "rank"), ("dp", "replica"), ("tp", "rank per stage (1 = none)")):
            value = getattr(c, field)
            if not _is_int(value) or value < 1:
                self.refuse(field, f"use an integer >= 1 ({what})")
        if not _is_int(c.num_microbatches) or c.num_microbatches < 1:
            self.refuse("num_microbatches", "use an integer >= 1")
        if c.num_virtual is not None and (not _is_int(c.num_virtual) or c.num_virtual < 1):
            self.refuse(
                "num_virtual", "give at least 1 stage per rank, or leave it unset for the family's default"
            )

    def recompute(self) -> None:
        value, num_layers = self.c.recompute, self.c.num_layers
        if isinstance(value, str):
            if value not in RECOMPUTE_MODES:
                self.refuse("recompute", 'use "none", "full", "selective" or a list of layer indices')
            return
        last = "" if num_layers is None else f" in 0..{num_layers - 1}"
        for index in value:
            if not _is_int(index) or index < 0 or (num_layers is not None and index >= num_layers):
                self.refuse(
                    "recompute", f"layer indices must lie{last or ' at or above 0'} (selective recomputation)"
                )

    def asynchronous(self) -> None:
        """Asynchronous schedules update each stage's weights inside the step from stashed
        versions of whole tensors: tied layers and replicas are reduced at each update
        (runtime/update_reduction.py), but nothing may split a weight or undo an update."""
        c, n = self.c, self.name
        if not c.asynchronous:
            return
        inside = f"{n('schedule')}={c.schedule!r} updates weights inside the step ({c.weight_update})"
        flush = "a flush schedule (gpipe, 1f1b, zb-h1, ...)"
        if c.tp > 1:
            self.refuse(
                "tp",
                f"{inside} from stashed copies of whole tensors, which tensor parallelism does "
                f"not split; use {n('tp')}=1 or {flush}",
            )
        if c.on_nonfinite != "raise":
            self.refuse(
                "on_nonfinite",
                f"{inside}, so a bad micro-batch cannot be undone; use "
                f"{n('on_nonfinite')}='raise' or {flush}",
            )

    def zero(self) -> None:
        c, n = self.c, self.name
        if not (c.zero or c.shard == "zero1"):
            return
        field = "zero" if c.zero else "shard"
        if c.asynchronous:
            self.refuse(
                field,
                f"{n('schedule')}={c.schedule!r} steps each stage's own optimizer inside the step (its "
                f"weight stash), which ZeRO does not shard; use {n('zero')}=False or a flush schedule",
            )
        if c.dp == 1:
            self.refuse(
                field,
                f"it shards the optimizer state over data-parallel replicas and there are "
                f"none ({n('dp')}=1); set {n('dp')} > 1 or {n('zero')}=False",
            )
        if c.tp > 1:
            self.refuse(
                field,
                f"ZeRO shards whole parameters, not tensor-parallel ones ({n('tp')}={c.tp}); "
                f"use {n('tp')}=1 or {n('zero')}=False",
            )

    def full_shard(self) -> None:
        c, n = self.c, self.name
        if c.shard not in SHARD_MODES:
            self.refuse("shard", f"use one of {', '.join(SHARD_MODES)}")
        if c.shard != "full":
            return
        keep = f"or {n('shard')}='replicate' (or 'zero1' to shard the optimizer state only)"
        if c.dp == 1:
            self.refuse(
                "shard",
                f"full sharding splits each stage over the data-parallel replicas and there are none "
                f"({n('dp')}=1); set {n('dp')} > 1 {keep}",
            )
        if c.asynchronous:
            self.refuse(
                "shard",
                f"{n('schedule')}={c.schedule!r} updates weights inside the step from stashed whole "
                f"copies, which full sharding does not keep; use a flush schedule (1f1b, zb-h1, ...) {keep}",
            )
        if c.zero:
            self.refuse(
                "shard",
                f"full sharding already shards the optimizer state (an optimizer over the pipeline's "
                f"parameters holds 1/dp of it); drop {n('zero')} {keep}",
            )

    def adaptive(self) -> None:
        """The adaptive choice switches one pipeline's order, micro-batches and recomputation
        between steps, from measurements every rank of it shares."""
        c, n = self.c, self.name
        if not c.adaptive:
            return
        if c.asynchronous:
            self.refuse(
                "adaptive",
                f"{n('schedule')}={c.schedule!r} updates weights inside the step, so its order cannot "
                "change between steps; use a flush schedule (1f1b, zb-h1, ...) or drop it",
            )
        # Replicas and tp peers agree on the measured step (pipefold.runtime.adaptive.agreed_step_s);
        # the chooser prices replicated weights and optimizer state, and a whole embedding and head.
        if c.dp > 1 and (c.zero or c.shard != "replicate"):
            field = "shard" if c.shard != "replicate" else "zero"
            self.refuse(
                field,
                f"the adaptive choice ({n('adaptive')}) prices every replica's weights and optimizer "
                f"state whole, not sharded, yet; use {n('shard')}='replicate' without {n('zero')}, or "
                f"drop {n('adaptive')}",
            )
        if c.vocab_parallel:
            self.refuse(
                "vocab_parallel",
                f"the adaptive choice ({n('adaptive')}) prices the embedding and output head whole on "
                f"their stages, not split by vocabulary, yet; drop {n('vocab_parallel')} or {n('adaptive')}",
            )
        if c.recompute != "none":
            self.refuse(
                "adaptive",
                f"it chooses the recomputation per batch itself ({n('recompute')}={c.recompute!r} is "
                f"given); leave {n('recompute')}='none' or drop it",
            )

    def tensor_parallel(self) -> None:
        c, n = self.c, self.name
        if c.sequence_parallel and c.tp == 1:
            self.refuse(
                "sequence_parallel",
                f"it splits the sequence over the tensor-parallel ranks of a "
                f"stage; set {n('tp')} > 1 or {n('sequence_parallel')}=False",
            )
        if c.sequence_parallel and c.seq_len is not None and c.seq_len % c.tp:
            fit = max(c.tp, c.seq_len - c.seq_len % c.tp)
            self.refuse(
                "seq_len",
                f"sequence parallelism splits every sequence over {n('tp')}={c.tp} ranks; "
                f"use a length divisible by {c.tp} (e.g. {fit})",
            )
        if c.vocab_parallel and c.tp == 1:
            self.refuse(
                "vocab_parallel",
                f"it splits the embedding and head over the tensor-parallel ranks of a stage; set "
                f"{n('tp')} > 1 or {n('vocab_parallel')}=False",
            )
        if c.vocab_parallel and c.vocab_size is not None and c.vocab_size % c.tp:
            padded = -(-c.vocab_size // c.tp) * c.tp
            self.refuse(
                "vocab_size",
                f"the vocabulary-parallel embedding and head split the vocabulary over {n('tp')}={c.tp} "
                f"ranks; pad the vocabulary to a multiple of {c.tp} (e.g. {padded}), or set "
                f"{n('vocab_parallel')}=False",
            )
        if c.compile and c.tp > 1:
            self.refuse(
                "compile",
                f"torch.compile of tensor-parallel (DTensor) layers is not supported by pipefold "
                f"yet; use {n('tp')}=1 or {n('compile')}=False",
            )
        if c.num_heads is not None and c.num_heads % c.tp:
            self.refuse(
                "tp",
                f"attention is split by heads, so it must divide {n('num_heads')}={c.num_heads} "
                "(and then divides the MLP width as well)",
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
