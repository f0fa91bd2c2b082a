"""Tied modules and shared parameters across ranks: one weight at several stages, its gradient
summed over the ranks that hold it.

    tied = TiedGradients.of(layers, schedule, partition, rank, local_modules, p2p, watchdog, shared,
                            collectives=collectives)
    before = tied.snapshot()      # before the step's backward
    ...                           # the step accumulates into .grad
    tied.sum(before)              # every owner now holds the sum of this step's contributions

Two kinds of weight are tied: a `TiedLayerSpec` key (every occurrence is one module), and a
parameter that several layers hold (`shared`, from `pipefold.model.build.shared_parameters`:
`head.weight = embed.weight` in a plain list, the tied embedding and head of a split module).
Only this step's contribution is exchanged (the gradient minus its snapshot), so gradients
accumulated across steps stay exact. After a flush step the owners exchange it: through a
shared-memory exchange of the owners (runtime/transport/shm_owners.py) where the step's own
collectives go through shared memory (CPU, every rank on one host), else point-to-point over the
pipeline's own group (no process group per tied module: a `new_group` would have to be called by
every rank of the world). Either way every owner adds the contributions in rank order, so the
owners' gradients are bit-identical. An asynchronous schedule sums at every STEP instead, over
process groups of the owners made once at construction (runtime/update_reduction.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from pipefold.model import LayerLike, Partition, owner_indices, tied_groups
from pipefold.model.build import shared_names
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.parallel.tensor_parallel import local
from pipefold.runtime.transport.comm import P2P, Collectives, Transfer
from pipefold.runtime.transport.shm_exchange import ShmExchange
from pipefold.runtime.transport.shm_owners import OWNER_CHUNK_BYTES, owner_exchanges
from pipefold.schedule import Schedule

__all__ = ["TiedGradients", "grad_copy", "laid_out_as"]

logger = logging.getLogger(__name__)

TiedGroup = tuple[tuple[int, ...], tuple[nn.Parameter, ...]]
"""(owner ranks, this rank's parameters of the tied module)."""


def laid_out_as(param: nn.Parameter, shard: Tensor) -> Tensor:
    """`shard` (this rank's part) as a gradient of `param`: a DTensor where `param` is one."""
    if isinstance(param, DTensor):
        return DTensor.from_local(
            shard, param.device_mesh, param.placements,
            run_check=False, shape=param.shape, stride=param.stride(),
        )
    return shard


def _local_bytes(param: nn.Parameter) -> int:
    """Bytes of this rank's part of `param` (its shard where tensor parallelism splits it)."""
    part = local(param)
    return part.numel() * part.element_size()


def grad_copy(param: nn.Parameter) -> Tensor | None:
    return None if param.grad is None else param.grad.detach().clone()


class TiedGradients:
    """The tied modules this rank shares with other ranks, and the exchange of their gradients."""

    def __init__(
        self,
        groups: Sequence[TiedGroup],
        rank: int,
        p2p: P2P | None,
        watchdog: Watchdog,
        all_owners: Sequence[tuple[int, ...]] = (),
        exchanges: Sequence[ShmExchange | None] = (),
    ) -> None:
        self.groups = tuple(groups)
        self.exchanges = tuple(exchanges) or (None,) * len(self.groups)
        """Per group, the owners' shared-memory exchange its gradient is summed through, or None
        (the process group)."""
        if len(self.exchanges) != len(self.groups):
            raise ValueError(f"{len(self.exchanges)} exchanges for {len(self.groups)} tied groups")
        self.rank = rank
        self._p2p = p2p
        self._watchdog = watchdog
        self.all_owners = tuple(all_owners)
        """The owner ranks of every tied module and shared parameter held by several ranks,
        this rank's or not, in one order on every rank of the pipeline (and its replicas)."""

    @classmethod
    def of(
        cls,
        layers: Sequence[LayerLike],
        schedule: Schedule,
        partition: Partition,
        rank: int,
        local_modules: Mapping[int, nn.Module],
        p2p: P2P | None,
        watchdog: Watchdog,
        shared: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        collectives: Collectives | None = None,
    ) -> TiedGradients:
        """For each tied module, and each parameter of `shared` (its name -> the layers that hold
        it and their names for it, as `shared_parameter_uses` gives them), held by several ranks
        and by this one: its owners and this rank's parameters. Given the pipeline's
        `collectives` (every rank passes them alike), the owners sum through shared memory where
        those do (`owner_exchanges`)."""
        found: list[TiedGroup] = []
        indices: list[int] = []  # each found group's index in `every`
        if p2p is None:
            return cls(found, rank, p2p, watchdog)

        def owners_of(indices: Sequence[int]) -> tuple[int, ...]:
            return tuple(sorted({schedule.placement[partition.stage_of(i)] for i in indices}))

        every: list[tuple[int, ...]] = []
        for key, occurrences in sorted(tied_groups(layers).items()):
            owners = owners_of(occurrences)
            if len(owners) > 1:
                every.append(owners)
            if len(owners) < 2 or rank not in owners:
                continue
            local = next(i for i in occurrences if i in local_modules)
            found.append((owners, tuple(local_modules[local].parameters())))
            indices.append(len(every) - 1)
            logger.debug("tied module %r is shared by ranks %s", key, owners)
        owner = owner_indices(layers)
        # After the tied modules, in name order: every owner walks the same list.
        for name, uses in sorted((shared or {}).items()):
            owners = owners_of([index for index, _ in uses])
            if len(owners) > 1:
                every.append(owners)
            if len(owners) < 2 or rank not in owners:
                continue
            local = next(index for index, _ in uses if index in local_modules)
            module = local_modules[local]
            names = shared_names(local, owner[local], module, shared)
            path = next(path for path, full in names.items() if full == name)
            found.append((owners, (module.get_parameter(path),)))
            indices.append(len(every) - 1)
            logger.debug("shared parameter %r is held by ranks %s", name, owners)
        exchanges: list[ShmExchange | None] = [None] * len(found)
        if collectives is not None:
            payload = [0] * len(every)
            for index, (_, params) in zip(indices, found, strict=True):
                largest = max(_local_bytes(p) for p in params)
                payload[index] = max(min(largest, OWNER_CHUNK_BYTES), 1)
            opened = owner_exchanges(collectives, rank=rank, groups=list(zip(every, payload, strict=True)))
            exchanges = [opened[index] for index in indices]
        return cls(found, rank, p2p, watchdog, every, exchanges)

    @property
    def p2p(self) -> P2P | None:
        """The transport the owners exchange through (None in one process)."""
        return self._p2p

    def snapshot(self) -> list[list[Tensor | None]]:
        """The tied parameters' gradients before the step (None where there is none yet)."""
        return [[grad_copy(p) for p in params] for _, params in self.groups]

    def sum(self, before: list[list[Tensor | None]]) -> None:
        """Sum this step's gradient of each tied module over its owners (identically on each),
        after a flush step (no message of the step is in flight)."""
        p2p = self._p2p
        if p2p is None:
            return
        for (owners, params), old, exchange in zip(self.groups, before, self.exchanges, strict=True):
            for param, previous in zip(params, old, strict=True):
                # A tensor-parallel weight (split by vocabulary) exchanges this rank's rows:
                # every owner of the same tp rank holds the same rows.
                grad = local(param.grad) if param.grad is not None else torch.zeros_like(local(param))
                delta = (grad if previous is None else grad - local(previous)).contiguous()
                if exchange is not None:
                    # In place: `delta` is this step's own tensor (or the gradient itself, which
                    # keeps its identity, as the replicas' sum keeps it); a new 32 MiB tensor
                    # costs more page faults than the sum costs copies. `total + previous` is
                    # `previous + total` bit for bit (addition commutes).
                    total = exchange.sum_in_rank_order(
                        delta, watchdog=self._watchdog, what="tied-gradient exchange", out=delta
                    )
                    summed = total if previous is None else total.add_(local(previous))
                    param.grad = laid_out_as(param, summed)
                    continue
                parts: dict[int, Tensor] = {self.rank: delta}
                pending: list[Transfer] = []
                for peer in owners:
                    if peer != self.rank:
                        pending.append(p2p.send_direct([delta], peer))
                        parts[peer] = torch.empty_like(delta)
                        pending.append(p2p.recv_direct([parts[peer]], peer))
                for transfer in pending:
                    transfer.wait(self._watchdog, "tied-gradient exchange")
                p2p.after_recv()
                # Summed in rank order on every owner, so the owners' weights stay bit-identical.
                total = parts[owners[0]]
                for rank in owners[1:]:
                    total = total + parts[rank]
                summed = total if previous is None else local(previous) + total
                param.grad = laid_out_as(param, summed)
