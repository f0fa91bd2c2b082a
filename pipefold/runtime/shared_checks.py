"""Refusing layouts in which weights held by several layers (tied layers, shared parameters)
could not stay one weight: split by a tensor-parallel plan, or updated apart by a schedule that
steps each stage inside the step (docs/decisions.md, "tensor parallel x pipeline"). Fully
sharded, two stages of one rank holding one weight are one FSDP unit (full_shard.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import LayerLike, Partition, layer_name, tied_groups
from pipefold.runtime.parallel.dims import ParallelDims
from pipefold.runtime.parallel.tensor_parallel import plan_for
from pipefold.runtime.parallel.vocab_parallel import VocabParallel
from pipefold.schedule import Schedule, WeightUpdate

__all__ = ["check_shared_parameters", "check_tied_layers_whole"]


def check_tied_layers_whole(
    layers: Sequence[LayerLike], meta: Sequence[nn.Module], dims: ParallelDims
) -> None:
    """Tied layers exchange whole gradients, so a tensor-parallel plan must leave them whole;
    or split every occurrence by vocabulary (`VocabParallel`): each tp rank then holds the same
    rows at every occurrence and exchanges the gradient of its rows."""
    for key, occurrences in sorted(tied_groups(layers).items()):
        split = [i for i in occurrences if dims.splits(i, meta[i])]
        by_vocab = [i for i in split if _by_vocabulary(dims, i, meta[i])]
        if by_vocab and by_vocab == list(occurrences):
            continue
        if split:
            raise ConfigError(
                f"tensor_parallel splits the tied layer {key!r} (layers {split}): tied layers exchange "
                "whole gradients between ranks; keep them out of the plan (return None for them)"
            )


def _by_vocabulary(dims: ParallelDims, index: int, module: nn.Module) -> bool:
    assert dims.tensor_parallel is not None
    entries = plan_for(dims.tensor_parallel, index, module)
    return list(entries) == [""] and isinstance(entries[""], VocabParallel)


def check_shared_parameters(
    shared: Mapping[str, tuple[tuple[int, str], ...]],
    layers: Sequence[LayerLike],
    meta: Sequence[nn.Module],
    dims: ParallelDims,
    schedule: Schedule,
    layout: Partition,
) -> None:
    """Refuse a shared parameter the pipeline cannot keep one weight: split by a tensor-parallel
    plan, or held by two stages of a schedule that updates each stage inside the step."""
    for name, uses in sorted(shared.items()):
        where = " and ".join(
            f"layer {index} ({layer_name(layers[index])}, stage {layout.stage_of(index)}) as {use!r}"
            for index, use in uses
        )
        split = [index for index, _ in uses if dims.splits(index, meta[index])]
        if split:
            raise ConfigError(
                f"parameter {name!r} is shared by {where}, and tensor_parallel splits layer(s) {split}: "
                "a shared parameter is tied by summing whole gradients between its holders; keep "
                "those layers out of the plan (return None for them)"
            )
        stages = {layout.stage_of(index) for index, _ in uses}
        if len(stages) > 1 and schedule.weight_update is not WeightUpdate.FLUSH:
            raise ConfigError(
                f"parameter {name!r} is shared by {where}: schedule {schedule.name!r} updates "
                "each stage's weights inside the step, so the stages would update their uses apart; "
                "use a flush schedule, or put every use on one stage (LayoutOptions(partition=...))"
            )
