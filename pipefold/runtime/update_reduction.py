"""One in-schedule update's gradient made whole before the stage steps (PipeDream, 2BW).

A flush schedule sums tied gradients and averages data-parallel replicas once, after the
step. An asynchronous schedule steps each stage inside the schedule (its STEP actions, in
`Pipeline.step` and in a streaming `Pipeline.train` alike), so at every STEP the stage's
gradient of that update is first

- summed over the ranks that hold a tied module with this stage (each owner then applies the
  same update to its copy, so the copies hold the same weight version after every update),
- then summed over the data-parallel replicas, each weighted by its share of the rows (every
  replica applies the same update: the gradient of the global batch's mean loss).

    reduction = UpdateReduction.of(stages, tied, schedule, rank, data_parallel_group, watchdog)
    reduction.begin(weight)        # this replica's rows / all replicas' rows, per step or run
    reduction.before_step(stage)   # at each STEP, before the stash's optimizer steps

Every owner of a tied module (and every replica) runs the same STEPs in the same order, so
the exchanges pair up; the check below refuses a schedule where they would not.
Design notes: docs/decisions.md, "streaming runs".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from pipefold.errors import ConfigError
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.tied import TiedGradients
from pipefold.schedule import Op, Schedule

__all__ = ["TIED_UPDATE_TAG", "UpdateReduction"]

TIED_UPDATE_TAG = 1
"""The message tag of the tied-gradient exchange at a STEP (the schedule's own messages use 0)."""


class UpdateReduction:
    """Per local stage: the tied groups it shares and the replicas it averages with."""

    def __init__(
        self,
        tied_of: Mapping[int, TiedGradients],
        params_of: Mapping[int, Sequence[nn.Parameter]],
        data_parallel_group: dist.ProcessGroup | None,
        watchdog: Watchdog,
    ) -> None:
        self._tied_of = dict(tied_of)
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
        device_type: str = "cpu",
    ) -> UpdateReduction:
        """`params_of`: each local stage's trainable parameters (those its stash steps)."""
        tied_of: dict[int, TiedGradients] = {}
        for stage, params in params_of.items():
            mine = {id(p) for p in params}
            groups = [group for group in tied.groups if any(id(p) in mine for p in group[1])]
            if not groups:
                continue
            if device_type == "cuda":
                # NCCL ignores message tags, so the exchange could pair with a boundary message
                # still in flight between the same ranks; untested without several GPUs.
                raise ConfigError(
                    f"schedule {schedule.name!r} on CUDA with a module tied across ranks "
                    f"{list(groups[0][0])}: the tied gradients summed at every update would share "
                    "NCCL's untagged channel with the schedule's messages; untie the module "
                    "(e.g. tie_embeddings=False), keep its uses on one stage, or use a flush schedule"
                )
            for owners, _ in groups:
                _check_steps_pair_up(schedule, owners, stage)
            tied_of[stage] = TiedGradients(groups, rank, tied.p2p, watchdog)
        return cls(tied_of, params_of, data_parallel_group, watchdog)

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
            # Boundary messages of the schedule may be in flight between the same two ranks
            # (through the process group when shared memory is off): a tag of its own.
            tied.sum([[None] * len(params) for _, params in tied.groups], tag=TIED_UPDATE_TAG)
        if self._group is None:
            return
        params = [p for p in self._params_of.get(stage, ()) if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads]).mul_(self._weight)
        work = dist.all_reduce(flat, group=self._group, async_op=True)
        if work is not None:
            self._watchdog.wait(work, what=f"data-parallel all-reduce of stage {stage}'s update", peer=None)
        offset = 0
        for param in params:
            param.grad = flat[offset : offset + param.numel()].view_as(param)
            offset += param.numel()


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
