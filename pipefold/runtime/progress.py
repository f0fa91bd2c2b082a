"""Where each rank is: the action or phase it runs, readable by its peers after it died or stopped.

Every rank of a pipeline on one host writes one integer per action into its own slot of
shared memory (the shared-memory exchange's header, see `ShmExchange.progress_slots`): a
store into a mapped page, tens of nanoseconds. The pipeline marks the phases outside the
executor's actions (`Pipeline.phase`: setting up a step, finishing it, the optimizer step,
a checkpoint save). A killed or stopped rank publishes nothing, so the ranks that notice it
read its slot and name the action it was at (docs/reliability.md, "The right culprit").

Without shared slots (ranks on several hosts, CUDA, one process) the slots are private:
`where` knows nothing and the waiters name what they waited for instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipefold.schedule import Action

__all__ = ["PHASES", "Progress", "process_state"]

PHASES = (
    "step setup",
    "the end of the step (loss and gradient reduction)",
    "optimizer step",
    "checkpoint save",
    "checkpoint load",
    "failed",
)
"""Phases outside the executor's actions, in the order of their codes."""

_PHASE_BASE = 1 << 24
"""Codes below it are executor actions (index + 1); 0 is "between steps"."""


def process_state(pid: int) -> str:
    """"running", "stopped" (SIGSTOP or a debugger) or "exited" (gone or a zombie) for `pid`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "exited"
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X", "x"):
        return "exited"
    return "stopped" if state in ("T", "t") else "running"


class Progress:
    """This rank's progress slot and read access to the other ranks' (see the module docstring).

    `slots[rank * stride]` is pipeline rank `rank`'s slot; `pids` the ranks' process ids where
    they are known to be on this host (None: the slots are private, nothing can be read).
    """

    def __init__(
        self, slots: memoryview | None, *, rank: int, num_ranks: int, stride: int = 1,
        pids: Sequence[int] | None = None,
    ) -> None:
        self.shared = slots is not None and pids is not None
        self.slots = slots if slots is not None else memoryview(bytearray(8 * num_ranks * stride)).cast("q")
        self.slot = rank * stride
        """The index of this rank's slot in `slots` (the executor writes `slots[slot]`)."""
        self.rank = rank
        self._stride = stride
        self._pids = tuple(pids) if pids is not None else None
        self.instructions: Sequence[Sequence[Action]] = ()
        """Every rank's lowered program (the running executor's): the code of the action at
        index i of a rank's row is i + 1."""

    def mark(self, phase: str) -> None:
        """Say that this rank is in `phase` (one of `PHASES`, or "" for between steps)."""
        self.slots[self.slot] = 0 if not phase else _PHASE_BASE + PHASES.index(phase)

    def where(self, rank: int) -> tuple[int | None, int | None, str] | None:
        """(stage, micro-batch, action) pipeline rank `rank` was last at; None where unknown."""
        if not self.shared:
            return None
        code = int(self.slots[rank * self._stride])
        if code == 0:
            return None, None, "between steps (the training loop)"
        if code >= _PHASE_BASE:
            index = code - _PHASE_BASE
            return None, None, PHASES[index] if index < len(PHASES) else "an unknown phase"
        row = self.instructions[rank] if rank < len(self.instructions) else ()
        if code - 1 >= len(row):
            return None
        action = row[code - 1]
        return action.stage, action.microbatch, str(action)

    def failed(self, rank: int) -> bool:
        """Whether `rank` marked itself failed (it raised; its exit is a consequence)."""
        return self.shared and int(self.slots[rank * self._stride]) == _PHASE_BASE + PHASES.index("failed")

    def gone(self) -> list[tuple[int, str]]:
        """The other pipeline ranks whose process exited or is stopped, with which ("exited",
        "stopped"), leaving out those that exited after marking themselves failed."""
        if self._pids is None:
            return []
        found = []
        for rank, pid in enumerate(self._pids):
            if rank == self.rank:
                continue
            state = process_state(pid)
            if state != "running" and not self.failed(rank):
                found.append((rank, state))
        return found

    def release(self) -> None:
        """Drop the view of shared memory (before its mapping closes)."""
        self.shared = False
        self.slots.release()
        self.slots = memoryview(bytearray(8 * (self.slot + 1))).cast("q")
