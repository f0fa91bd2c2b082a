"""Resolving and checking `Pipeline`'s arguments before any communication: the option groups,
the schedule and its micro-batch count, recomputation, the partition, and whether the schedule
wants an optimizer (asynchronous) or leaves the update to the user (flush)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import LayerLike, Partition, partition, tied_groups
from pipefold.parallel_config import ParallelConfig
from pipefold.runtime.master import keeps_fp32_masters
from pipefold.runtime.options import (
    PURE_PRECISIONS,
    LayoutOptions,
    OptimizerFactory,
    ParallelOptions,
    RuntimeOptions,
    TransportOptions,
)
from pipefold.schedule import Schedule, WeightUpdate, build
from pipefold.schedule.validate import validate

__all__ = [
    "DEFAULT_NUM_MICROBATCHES",
    "check_optimizer",
    "check_swappable",
    "describe",
    "num_microbatches_of",
    "option_group",
    "resolve_partition",
    "resolve_recompute",
    "resolve_schedule",
]

DEFAULT_NUM_MICROBATCHES = 8
"""Micro-batches per step where neither the caller nor a ready `Schedule` says."""

OptionGroup = TypeVar("OptionGroup", LayoutOptions, ParallelOptions, RuntimeOptions, TransportOptions)


def option_group(value: Any, kind: type[OptionGroup], keyword: str) -> OptionGroup:
    """`value` (None: `kind()`, every default), refused unless it is a `kind`."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise ConfigError(
            f"Pipeline({keyword}={value!r}): give a pipefold.runtime.{kind.__name__}(...) "
            "(see pipefold/runtime/options.py)"
        )
    return value


def describe(
    layers: Sequence[LayerLike],
    schedule: str | Schedule,
    num_microbatches: int | None,
    num_virtual: int | None,
    degrees: tuple[int, int, int],
    layout: LayoutOptions,
    parallel: ParallelOptions,
    runtime: RuntimeOptions,
) -> ParallelConfig:
    """What the rulebook (`pipefold.parallel_config`) checks of a `Pipeline`'s arguments before
    its schedule is built; `degrees` are (pp, dp, tp)."""
    recompute = layout.recompute
    num_ranks, num_data_parallel, num_tensor_parallel = degrees
    return ParallelConfig(
        pp=num_ranks,
        dp=num_data_parallel,
        tp=num_tensor_parallel,
        num_microbatches=num_microbatches_of(schedule, num_microbatches),
        num_virtual=num_virtual,
        schedule=schedule.name if isinstance(schedule, Schedule) else str(schedule),
        recompute=recompute if isinstance(recompute, str) else tuple(recompute),
        on_nonfinite=runtime.on_nonfinite,
        compile=runtime.compile,
        tied_layers=bool(tied_groups(layers)),
        num_layers=len(layers),
        shard=parallel.shard,
        precision=runtime.precision,
    )


def check_swappable(current: Schedule, schedule: Any, most_microbatches: int) -> Schedule:
    """`schedule` if a running pipeline of `current` can switch to it (`Pipeline.use_schedule`):
    a valid flush schedule for the same ranks and stage placement with at most
    `most_microbatches` (what the pipeline was built with: its transport is sized for them),
    so every rank keeps its stages, weights, optimizer and transport. Raises ConfigError otherwise."""
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"use_schedule({schedule!r}): give a pipefold.schedule.Schedule")
    if schedule.num_microbatches > most_microbatches:
        raise ConfigError(
            f"use_schedule: {schedule.name!r} has {schedule.num_microbatches} micro-batches, more than "
            f"the {most_microbatches} this pipeline was built with (its transport is sized for "
            "them); build the Pipeline with the most micro-batches you will run"
        )
    for what, now, new in (
        ("ranks", current.num_ranks, schedule.num_ranks),
        ("stage placement", current.placement, schedule.placement),
        ("weight update", current.weight_update, schedule.weight_update),
    ):
        if now != new:
            raise ConfigError(
                f"use_schedule: {schedule.name or 'the schedule'!r} has {what} {new}, the running "
                f"{current.name!r} {now}; a pipeline changes only the order of its actions (build a "
                "new Pipeline for another layout)"
            )
    if schedule.weight_update is not WeightUpdate.FLUSH:
        raise ConfigError(
            f"use_schedule: {schedule.name!r} updates weights inside the step; only flush schedules "
            "can be swapped (their stashes hold the weight versions in flight)"
        )
    validate(schedule)
    return schedule


def resolve_schedule(
    schedule: str | Schedule, num_ranks: int, num_microbatches: int | None, num_virtual: int | None
) -> Schedule:
    if isinstance(schedule, Schedule):
        if schedule.num_ranks != num_ranks:
            raise ConfigError(
                f"schedule {schedule.name!r} is for {schedule.num_ranks} ranks but the process group has "
                f"{num_ranks}; build it with num_ranks={num_ranks}"
            )
        if num_microbatches is not None and num_microbatches != schedule.num_microbatches:
            raise ConfigError(
                f"num_microbatches={num_microbatches} but schedule {schedule.name!r} has "
                f"{schedule.num_microbatches}; leave num_microbatches unset when passing a Schedule"
            )
        if num_virtual is not None and num_virtual != schedule.num_virtual:
            raise ConfigError(
                f"num_virtual={num_virtual} but schedule {schedule.name!r} has {schedule.num_virtual} "
                "stages per rank; leave num_virtual unset when passing a Schedule"
            )
        return schedule
    if not isinstance(schedule, str):
        raise ConfigError(f"schedule must be a family name or a Schedule, got {type(schedule).__name__}")
    count = num_microbatches_of(schedule, num_microbatches)
    return build(schedule, num_ranks=num_ranks, num_microbatches=count, num_virtual=num_virtual)


def num_microbatches_of(schedule: str | Schedule, num_microbatches: int | None) -> int:
    if num_microbatches is not None:
        return num_microbatches
    return schedule.num_microbatches if isinstance(schedule, Schedule) else DEFAULT_NUM_MICROBATCHES


def resolve_recompute(recompute: str | Sequence[int]) -> tuple[bool, frozenset[int]]:
    """(recompute every layer, the layers to recompute); the rulebook has checked the value.
    "selective" is neither: the attention cores inside the layers recompute (runtime/selective.py)."""
    if isinstance(recompute, str):
        return recompute == "full", frozenset()
    return False, frozenset(recompute)


def resolve_partition(
    layers: Sequence[LayerLike], schedule: Schedule, method: str | Sequence[int] | Partition
) -> Partition:
    return partition(layers, schedule.num_stages, method, placement=schedule.placement)


def check_optimizer(schedule: Schedule, runtime: RuntimeOptions, optimizer: OptimizerFactory | None) -> None:
    """Flush schedules leave the update to the user; asynchronous ones step inside `step`."""
    name = schedule.name
    if schedule.weight_update is WeightUpdate.FLUSH:
        if optimizer is not None:
            raise ConfigError(
                f"ParallelOptions.optimizer is given but schedule {name!r} is a flush schedule; step "
                "your optimizer after pipe.step() yourself and leave ParallelOptions.optimizer None"
            )
        return
    if runtime.loss_scale is not None:
        raise ConfigError(
            f"RuntimeOptions(precision='fp16') with schedule {name!r}: it updates weights inside the "
            "step, from gradients still multiplied by the loss scale and before every rank has agreed "
            "on an overflow; use a flush schedule for fp16, or bf16 (no loss scale)"
        )
    if optimizer is None:
        raise ConfigError(
            f"schedule {name!r} updates weights during the step ({schedule.weight_update}); pass "
            "parallel=ParallelOptions(optimizer=lambda params: torch.optim.SGD(params, lr=...)) "
            "(a factory)"
        )
    check_stashable(optimizer, name, masters=runtime.precision in PURE_PRECISIONS)


def check_stashable(optimizer: OptimizerFactory, schedule_name: str, *, masters: bool = False) -> None:
    """Refuse a factory whose optimizer a stage's weight stash cannot step: it is called once on
    a probe parameter (cheap, before any rank communicates). The stash calls `step()` with no
    closure at each STEP, on exactly the parameters it passed, and moves their storage between
    versions, so the optimizer must be a `torch.optim.Optimizer` over those parameters that
    steps without a closure. `masters` (bf16 weights, `precision="bf16-pure"`): it must keep
    fp32 master copies (`fp32_master_weights`), or the updates would round into bf16."""
    probe = nn.Parameter(torch.zeros(1))
    where = f"ParallelOptions.optimizer (schedule {schedule_name!r} steps it inside the pipeline)"
    try:
        built = optimizer(iter([probe]))
    except Exception as error:
        raise ConfigError(
            f"{where} raised {type(error).__name__}: {error} when called with an iterator of parameters; "
            "give a factory such as lambda params: torch.optim.SGD(params, lr=0.1)"
        ) from error
    if not isinstance(built, torch.optim.Optimizer):
        raise ConfigError(
            f"{where} returned {type(built).__name__}, not a torch.optim.Optimizer; give a factory "
            "such as lambda params: torch.optim.AdamW(params, lr=1e-3)"
        )
    if isinstance(built, torch.optim.LBFGS):
        raise ConfigError(
            f"{where} returned LBFGS, which re-evaluates the loss through a closure at every step; "
            "a stashed stage steps without one, between other micro-batches' forwards: use a "
            "first-order optimizer (SGD, Adam, AdamW, ...)"
        )
    held = [p for group in built.param_groups for p in group["params"]]
    if len(held) != 1 or held[0] is not probe:
        raise ConfigError(
            f"{where} returned an optimizer over {len(held)} other tensor(s), not over the parameters "
            "it was given: the stage's stash would not update its weights; build it from the "
            "factory's argument (lambda params: torch.optim.SGD(params, lr=...)), not from "
            "model.parameters()"
        )
    if masters and not keeps_fp32_masters(built):
        raise ConfigError(
            f"{where} returned a {type(built).__name__}, which would step the bf16 weights of "
            "RuntimeOptions(precision='bf16-pure') in bf16; give one that keeps fp32 master weights: "
            f"lambda params: fp32_master_weights({type(built).__name__})(params, ...) "
            "(pipefold.runtime.fp32_master_weights)"
        )
