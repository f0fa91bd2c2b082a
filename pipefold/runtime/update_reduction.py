"""One in-schedule update's gradient made whole before the stage steps (PipeDream, 2BW).

A flush schedule sums tied gradients and averages data-parallel replicas once, after the
step. An asynchronous schedule steps each stage inside the schedule (its STEP actions, in
`Pipeline.step` and in a streaming `Pipeline.train` alike), so at every STEP the stage's
gradient of that update is first

- summed over the ranks that hold a tied module with this stage (each owner then applies the
  same update to its copy, so the copies hold the same weight version after every update):
  an all-reduce over a process group of those owners, its own communicator, so it never
  pairs with a boundary message still in flight between the same ranks (on every backend),
- then summed over the data-parallel replicas, each weighted by its share of the rows (every
  replica applies the same update: the gradient of the global batch's mean loss).

Both sums run in fp32 for bf16 weights (`precision="bf16-pure"`), as the flush schedules'
data-parallel all-reduce does (`data_parallel.reduce_dtype`), and round once into bf16 before
the stage's optimizer steps its fp32 masters.

    groups = owner_groups(tied, dims)  # at construction; every rank of the world calls it
    reduction = UpdateReduction.of(stages, tied, schedule, rank, data_parallel_group, watchdog,
                                   groups=groups)
    reduction.begin(weight)        # this replica's rows / all replicas' rows, per step or run
    reduction.before_step(stage)   # at each STEP, before the stash's optimizer steps

Every owner of a tied module (and every replica) runs the same STEPs in the same order, so
the exchanges pair up; the check below refuses a schedule where they would not.
Design notes: docs/decisions.md, "streaming runs".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipefold.errors import ConfigError, PipelineError
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.parallel.data_parallel import reduce_dtype
from pipefold.runtime.parallel.dims import ParallelDims
from pipefold.runtime.parallel.tensor_parallel import local
from pipefold.runtime.tied import TiedGradients, laid_out_as
from pipefold.schedule import Op, Schedule

__all__ = ["UpdateReduction", "owner_groups"]

Owners = tuple[int, ...]
"""Pipeline ranks that hold one tied module."""


def owner_groups(tied: TiedGradients, dims: ParallelDims) -> dict[Owners, dist.ProcessGroup]:
    """A process group of each tied module's owners that this rank is one of (owners -> group).

    `dist.new_group` must be entered by every rank of the world in one order, so every rank
    of every pipeline in the world calls this at construction, and every pipeline in the world
    must be built alike (replicas and tensor-parallel peers are): each learns the other
    pipelines' owners (their world ranks) and all create every distinct group in sorted order.
    Nothing is created, nor exchanged, where the model ties nothing across ranks."""
    if not tied.all_owners or dims.pipeline_group is None:
        return {}
    world_ranks = {owners: tuple(dims.ranks[r] for r in owners) for owners in tied.all_owners}
    mine = sorted(set(world_ranks.values()))
    every: list[Any] = [mine]
    if dist.get_world_size() != len(dims.ranks):
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    me = dist.get_rank()
    created: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for ranks in sorted({tuple(ranks) for sets in every for ranks in sets}):
        group = dist.new_group(list(ranks))
        if me in ranks:
            created[ranks] = group
    return {owners: created[ranks] for owners, ranks in world_ranks.items() if me in ranks}


class UpdateReduction:
    """Per local stage: the tied groups it shares and the replicas it averages with."""

    def __init__(
        self,
        tied_of: Mapping[int, TiedGradients],
        params_of: Mapping[int, Sequence[nn.Parameter]],
        data_parallel_group: dist.ProcessGroup | None,
        watchdog: Watchdog,
        groups: Mapping[Owners, dist.ProcessGroup],
    ) -> None:
        self._tied_of = dict(tied_of)
        self._groups = dict(groups)
        self._params_of = {stage: tuple(params) for stage, params in params_of.items()}
        self._group = data_parallel_group
        self._watchdog = watchdog
        self._weight = 1.0

    @classmethod
    def of(
        cls,
        params_of: Mapping[int, Sequence[nn.Parameter]],
        tied: TiedGradients,
        schedule: Schedule,
        rank: int,
        data_parallel_group: dist.ProcessGroup | None,
        watchdog: Watchdog,
        *,
        groups: Mapping[Owners, dist.ProcessGroup],
    ) -> UpdateReduction:
        """`params_of`: each local stage's trainable parameters (those its stash steps);
        `groups`: a process group per tied module's owners (`owner_groups`)."""
        tied_of: dict[int, TiedGradients] = {}
        for stage, params in params_of.items():
            mine = {id(p) for p in params}
            held = [group for group in tied.groups if any(id(p) in mine for p in group[1])]
            if not held:
                continue
            for owners, _ in held:
                _check_steps_pair_up(schedule, owners, stage)
                if owners not in groups:
                    raise PipelineError(
                        f"rank {rank} holds a module tied with ranks {list(owners)} but has no process "
                        "group of them (runtime/update_reduction.py owner_groups)"
                    )
            tied_of[stage] = TiedGradients(held, rank, tied.p2p, watchdog)
        return cls(tied_of, params_of, data_parallel_group, watchdog, groups)

    @property
    def needed(self) -> bool:
        """Whether any STEP of this rank exchanges something."""
        return bool(self._tied_of) or self._group is not None

    def begin(self, weight: float) -> None:
        """The replica's weight (its rows / all replicas' rows) for the updates that follow."""
        self._weight = weight

    def before_step(self, stage: int) -> None:
        """Make `stage`'s gradient of this update whole: tied owners sum, replicas average."""
        tied = self._tied_of.get(stage)
        if tied is not None:
            for owners, tied_params in tied.groups:
                self._sum_tied(stage, owners, tied_params)
        if self._group is None:
            return
        params = [p for p in self._params_of.get(stage, ()) if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = flat.to(reduce_dtype(flat.dtype)).mul_(self._weight)
        work = dist.all_reduce(flat, group=self._group, async_op=True)
        if work is not None:
            self._watchdog.wait(work, what=f"data-parallel all-reduce of stage {stage}'s update", peer=None)
        offset = 0
        for param in params:
            # bf16 weights: the fp32 sum rounds once, into the gradient's dtype.
            param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype)
            offset += param.numel()


    def _sum_tied(self, stage: int, owners: Owners, params: Sequence[nn.Parameter]) -> None:
        """Each owner's gradient of this update, summed over the owners' own group: identical
        on every owner (an all-reduce hands every member the same result)."""
        group = self._groups[owners]
        summed: list[torch.Tensor] = []
        works = []
        for param in params:
            # A tensor-parallel weight (split by vocabulary) sums this rank's rows: every owner
            # of the same tp rank holds the same rows.
            grad = local(param.grad) if param.grad is not None else torch.zeros_like(local(param))
            # A copy (the all-reduce writes into it), in fp32 for bf16 weights.
            summed.append(grad.to(reduce_dtype(grad.dtype), copy=True).contiguous())
            works.append(dist.all_reduce(summed[-1], group=group, async_op=True))
        for work in works:
            if work is not None:
                self._watchdog.wait(work, what=f"tied-gradient sum of stage {stage}'s update", peer=None)
        for param, grad in zip(params, summed, strict=True):
            param.grad = laid_out_as(param, grad.to(local(param).dtype))


def _check_steps_pair_up(schedule: Schedule, owners: Sequence[int], stage: int) -> None:
    """Refuse a schedule whose owners of one tied module step a different number of times:
    each STEP of one owner exchanges with the same-numbered STEP of the others."""
    counts = {
        owner: sum(1 for action in schedule.actions[owner] if action.op is Op.STEP) for owner in owners
    }
    if len(set(counts.values())) > 1:
        raise ConfigError(
            f"schedule {schedule.name!r}: the ranks {list(owners)} that hold a tied module with stage "
            f"{stage} step {counts} times; their tied gradients are summed at each update, so they must "
            "update equally often (untie the module, or use a flush schedule)"
        )
