"""Shared-memory exchanges among the owners of a tied weight, for ranks on one host (CPU).

    exchanges = owner_exchanges(collectives, rank=rank, groups=[(owners, chunk_bytes), ...])
    total = exchanges[i].sum_in_rank_order(delta, watchdog=watchdog, what="tied-gradient exchange")

Every rank of the pipeline calls `owner_exchanges` alike, with every tied weight's owners in one
order (two small all-gathers). Where the step's own collectives go through shared memory
(`Collectives.exchange`: every rank on this host, CPU), the first owner of each group creates an
`ShmExchange` among the group's owners, the others open it; a group whose owners do not all hold
it gets None and sums through the process group. Waits block on the step exchange's doorbells
where ranks share cores. Design notes: docs/decisions.md, "tied gradients through shared memory".
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

from pipefold.runtime.transport.comm import Collectives, _process_alive
from pipefold.runtime.transport.shm import SHM_DIR, new_token, shm_name
from pipefold.runtime.transport.shm_exchange import ShmExchange

__all__ = ["OWNER_CHUNK_BYTES", "owner_exchanges"]

logger = logging.getLogger(__name__)

OWNER_CHUNK_BYTES = 4 << 20
"""The most bytes of one tied gradient an owner puts through its exchange at once (a larger
one goes in chunks): the file holds two chunks per owner, and a chunk this size still sums at
the copy's speed (docs/decisions.md, "tied gradients through shared memory")."""

Group = tuple[tuple[int, ...], int]
"""(the owner ranks, sorted; the largest payload in bytes, as this rank computes it, 0 where it
owns none of the group)."""


def owner_exchanges(
    collectives: Collectives, *, rank: int, groups: Sequence[Group]
) -> list[ShmExchange | None]:
    """For each group: a shared-memory exchange among its owners where this rank is one and every
    owner opened it, else None. `groups` is the same list on every rank of the pipeline."""
    result: list[ShmExchange | None] = [None] * len(groups)
    base = collectives.exchange
    # Both are the same on every rank (the step exchange is on everywhere or nowhere), so every
    # rank takes part in the handshake below, or none does.
    if base is None or not groups:
        return result
    created: dict[int, ShmExchange] = {}
    announced_mine: dict[int, tuple[int, int]] = {}
    for index, (owners, capacity) in enumerate(groups):
        if not owners or owners[0] != rank or capacity < 1:
            continue
        token = new_token()
        try:
            created[index] = ShmExchange.create(
                SHM_DIR, _name(token, index), num_ranks=len(owners), capacity=capacity, token=token
            )
            announced_mine[index] = (token, capacity)
        except OSError as error:
            logger.info("no shared-memory exchange for the tied weight of ranks %s (%s): process group",
                        owners, error)
    announced = collectives.all_gather_object((os.getpid(), announced_mine), what="tied-exchange handshake")
    opened: dict[int, ShmExchange] = {}
    for index, (owners, _) in enumerate(groups):
        if rank not in owners or owners[0] == rank:
            continue
        entry = announced[owners[0]][1].get(index)
        if entry is None:
            continue
        token, capacity = entry
        exchange = ShmExchange.open(
            SHM_DIR, _name(token, index), num_ranks=len(owners), rank=owners.index(rank),
            capacity=capacity, token=token,
        )
        if exchange is not None:
            opened[index] = exchange
    accepted = collectives.all_gather_object(sorted(opened), what="tied-exchange handshake")
    for index, exchange in created.items():
        exchange.unlink()  # every owner that will open it has: no file outlives a killed rank
        opened[index] = exchange
    others = [other for other in range(base.num_ranks) if other != rank]
    for index, exchange in sorted(opened.items()):
        owners = groups[index][0]
        if not all(index in accepted[owner] for owner in owners[1:]):
            exchange.close()
            continue
        peers = [owner for owner in owners if owner != rank]
        pids = [int(announced[peer][0]) for peer in peers]
        # Another PID namespace can share /dev/shm; only trust pids that exist here.
        if all(_process_alive(pid) for pid in pids):
            exchange.peer_alive = functools.partial(_all_alive, tuple(pids))
        if base.doorbell is not None and len(base.ringers) == len(others):
            # Shared with the step exchange (whose `close` closes them; this exchange is left to
            # the garbage collector, as the step's is): a wait checks its own flag before it
            # blocks, so a ring meant for either only wakes a waiter early.
            exchange.doorbell = base.doorbell
            exchange.ringers = [base.ringers[others.index(peer)] for peer in peers]
        result[index] = exchange
    return result


def _all_alive(pids: Sequence[int]) -> bool:
    return all(_process_alive(pid) for pid in pids)


def _name(token: int, index: int) -> str:
    return shm_name(f"{token:x}-tied-{index}")
