"""Which torch.distributed.pipelining schedule each pipefold schedule is timed against.

Both sides of a pair get the same stage layout (placement of the 8 layers' stages on the
ranks), so they run the same stage modules; only the schedule implementation differs.
No torch import.

Zero-bubble is paired as `zb-h1` against `ScheduleInterleavedZeroBubble`, one stage per
rank on both sides (docs/decisions.md, "zero-bubble pairing"); `auto` and `auto-v` are
pipefold-only rows, timed against the one-process baseline only (docs/decisions.md,
"pipefold-only rows").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipefold.errors import ConfigError
from pipefold.schedule.ir import contiguous_placement, looped_placement, v_placement

__all__ = ["PAIRS", "SOLO", "SchedulePair", "pair"]

Layout = Literal["contiguous", "looped", "v"]


@dataclass(frozen=True)
class SchedulePair:
    """A pipefold schedule family and its torch counterpart, with the shared stage layout."""

    schedule: str
    """pipefold family name (pipefold.schedule.build)."""
    torch_class: str | None
    """Class name in torch.distributed.pipelining; None for a pipefold-only row."""
    layout: Layout
    num_virtual: int
    """Stages per rank on both sides."""

    def placement(self, num_ranks: int) -> tuple[int, ...]:
        """Owning rank of every stage, in model order."""
        if self.layout == "contiguous":
            return contiguous_placement(num_ranks)
        if self.layout == "looped":
            return looped_placement(num_ranks, self.num_virtual)
        return v_placement(num_ranks, self.num_virtual)

    def stages_of(self, rank: int, num_ranks: int) -> list[int]:
        return [stage for stage, owner in enumerate(self.placement(num_ranks)) if owner == rank]

    def peer_refusal(self, num_ranks: int, num_microbatches: int) -> str | None:
        """Why torch would refuse (or misbehave on) this configuration, else None.

        Checked before any rank builds the schedule: a torch schedule that fails inside
        `step` leaves the other ranks blocked in gloo.
        """
        if self.torch_class is None:
            return f"{self.schedule} is pipefold's own (searched) schedule; torch has none"
        if self.torch_class == "Schedule1F1B" and num_microbatches < num_ranks:
            return f"torch Schedule1F1B needs microbatches >= ranks ({num_microbatches} < {num_ranks})"
        if self.torch_class == "ScheduleDualPipeV" and num_microbatches < 2 * num_ranks:
            return (
                f"torch ScheduleDualPipeV needs microbatches >= 2 x ranks "
                f"({num_microbatches} < {2 * num_ranks})"
            )
        return None


PAIRS: dict[str, SchedulePair] = {
    entry.schedule: entry
    for entry in (
        SchedulePair("gpipe", "ScheduleGPipe", "contiguous", 1),
        SchedulePair("1f1b", "Schedule1F1B", "contiguous", 1),
        SchedulePair("interleaved-1f1b", "ScheduleInterleaved1F1B", "looped", 2),
        SchedulePair("looped-bfs", "ScheduleLoopedBFS", "looped", 2),
        SchedulePair("zb-h1", "ScheduleInterleavedZeroBubble", "contiguous", 1),
        SchedulePair("zb-v", "ScheduleZBVZeroBubble", "v", 2),
        SchedulePair("dualpipe-v", "ScheduleDualPipeV", "v", 2),
    )
}


SOLO: dict[str, SchedulePair] = {
    entry.schedule: entry
    for entry in (
        SchedulePair("auto", None, "contiguous", 1),
        SchedulePair("auto-v", None, "v", 2),
    )
}
"""pipefold-only rows: schedules searched from measured costs (docs/decisions.md, "pipefold-only rows")."""


def pair(schedule: str) -> SchedulePair:
    found = PAIRS.get(schedule) or SOLO.get(schedule)
    if found is None:
        raise ConfigError(
            f"schedule={schedule!r} is not a benchmark row; choose from {', '.join([*PAIRS, *SOLO])}"
        )
    return found
