"""Setting up a pipeline's transport: point-to-point transfers and the group's collectives.

    transport = Transport.connect(group, ranks, rank, device, watchdog, program, options)
    transport.p2p            # boundary tensors (None in one process)
    transport.collectives    # the step's start broadcast and end gather (None in one process)

On CPU, ranks on one host send boundary tensors through shared memory where
`TransportOptions` allows it (sized per peer by `shared_memory_bytes`), and everything else
through the process group. Only the peers this rank's program sends to or receives from get
a shared-memory channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipefold.runtime import step_gather
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.options import TransportOptions
from pipefold.runtime.transport.comm import P2P, Collectives
from pipefold.schedule import Op, Schedule
from pipefold.schedule.lower import Program

__all__ = ["Transport", "most_slots"]

_MIN_COLLECTIVE_BYTES = 64 * 1024


def most_slots(schedule: Schedule) -> int:
    """An upper bound on the actions of any rank's program for a flush schedule of this layout:
    per (stage, micro-batch) an F, an I and a W, and four messages."""
    per_rank = max(len(schedule.stages_of(rank)) for rank in range(schedule.num_ranks))
    return 7 * per_rank * schedule.num_microbatches


@dataclass(frozen=True)
class Transport:
    """The pipeline group's point-to-point transport and collectives (both None in one process)."""

    p2p: P2P | None
    collectives: Collectives | None

    @classmethod
    def connect(
        cls,
        group: dist.ProcessGroup | None,
        ranks: Sequence[int],
        rank: int,
        device: torch.device,
        watchdog: Watchdog,
        program: Program,
        options: TransportOptions,
    ) -> Transport:
        """Open the transport of `rank` for `program` (every rank of `group` calls it alike)."""
        if group is None:
            return cls(None, None)
        p2p = P2P(group, ranks, device)
        collectives = Collectives(group, ranks, device, watchdog)
        if options.shared_memory and options.shared_memory_bytes > 0 and device.type == "cpu":
            mine = [a for a in program.instructions[rank] if a.op.is_message]
            p2p.connect_same_host(
                collectives,
                rank=rank,
                send_peers=[program.peer_of(a) for a in mine if a.op in (Op.SEND_F, Op.SEND_B)],
                recv_peers=[program.peer_of(a) for a in mine if a.op in (Op.RECV_F, Op.RECV_B)],
                capacity=options.shared_memory_bytes,
            )
            # The step's start broadcast and end gather; the gathered row is the largest payload.
            # Sized for any flush schedule of this layout, so that `Pipeline.use_schedule` fits too.
            schedule = program.schedule
            slots = max(max(len(row) for row in program.instructions), most_slots(schedule))
            row_bytes = 8 * step_gather.row_length(slots, schedule.num_microbatches)
            collectives.connect_same_host(capacity=max(row_bytes, _MIN_COLLECTIVE_BYTES))
        return cls(p2p, collectives)
