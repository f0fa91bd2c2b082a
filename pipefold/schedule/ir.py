"""The schedule IR: `Op`, `Action`, `Schedule`.

A schedule is data: for every rank, an ordered tuple of actions. Generators
produce it, `validate` checks it, the simulator predicts it, the runtime executes
its lowered form and the visualizer draws it. Nothing here imports torch.

`stage` is always the virtual stage (model chunk) index in model order; `placement[stage]`
is its rank (docs/decisions.md, "Stage numbering").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from pipefold.errors import ScheduleError

__all__ = [
    "Op",
    "Action",
    "WeightUpdate",
    "Schedule",
    "contiguous_placement",
    "looped_placement",
    "v_placement",
    "format_grid",
]


class Op(str, Enum):
    """What an action does.

    Compute ops appear in generated schedules; the four communication ops are
    only ever added by the lowering pass (`pipefold.schedule.lower`). The three sharding
    ops are added to a schedule by `pipefold.schedule.shard.add_sharding` (full sharding:
    the schedule decides when each stage's weights are gathered, freed and its gradients
    reduced); for them `microbatch` counts the occurrences of that op on that stage.
    """

    F = "F"
    """Forward of one micro-batch through one stage."""
    B = "B"
    """Full backward: input gradient and weight gradient together."""
    I = "I"  # noqa: E741 - the literature's letter for the input-gradient backward
    """Backward for the input gradient only (zero-bubble split of B)."""
    W = "W"
    """Backward for the weight gradient only; needs the same micro-batch's I first."""
    STEP = "STEP"
    """Optimizer update of one stage's weights (asynchronous schedules only)."""
    SEND_F = "SEND_F"
    """Send the output of F(stage, microbatch) to the rank of stage + 1."""
    RECV_F = "RECV_F"
    """Post the receive of the input of F(stage, microbatch) from the rank of stage - 1."""
    SEND_B = "SEND_B"
    """Send the input gradient of stage's backward to the rank of stage - 1."""
    RECV_B = "RECV_B"
    """Post the receive of the output gradient of stage's backward from the rank of stage + 1."""
    UNSHARD = "UNSHARD"
    """Start gathering the stage's whole weights from its data-parallel shards (collective over
    the replicas); the stage's next compute action waits for it."""
    RESHARD = "RESHARD"
    """Free the stage's gathered weights, keeping this replica's shard."""
    REDUCE_GRAD = "REDUCE_GRAD"
    """Reduce-scatter the stage's gradients of the step into each replica's shard."""

    @property
    def is_compute(self) -> bool:
        return self in _COMPUTE_OPS

    @property
    def is_sharding(self) -> bool:
        """True for UNSHARD, RESHARD and REDUCE_GRAD (collectives over the data-parallel replicas)."""
        return self in _SHARDING_OPS

    @property
    def is_message(self) -> bool:
        """True for the point-to-point ops the lowering adds (SEND_*, RECV_*)."""
        return self in _MESSAGE_OPS

    @property
    def is_backward(self) -> bool:
        """True for the ops that consume the next stage's gradient (B and I)."""
        return self is Op.B or self is Op.I

    def __str__(self) -> str:
        return self.value


_COMPUTE_OPS = frozenset({Op.F, Op.B, Op.I, Op.W, Op.STEP})
_SHARDING_OPS = frozenset({Op.UNSHARD, Op.RESHARD, Op.REDUCE_GRAD})
_MESSAGE_OPS = frozenset({Op.SEND_F, Op.RECV_F, Op.SEND_B, Op.RECV_B})

# Longest names first so that "SEND_F" is not read as "S…".
_ACTION_RE = re.compile(
    r"^(?P<op>REDUCE_GRAD|UNSHARD|RESHARD|SEND_F|RECV_F|SEND_B|RECV_B|STEP|F|B|I|W)(?P<stage>\d+)\.(?P<microbatch>\d+)$"
)


@dataclass(frozen=True, slots=True, order=True)
class Action:
    """One op of one stage on one micro-batch. `str(Action(Op.F, 3, 7)) == "F3.7"`.

    For `STEP` and the sharding ops, `microbatch` counts the occurrences of that op on that
    stage within one call (0, 1, …), so every action of a schedule is distinct.
    """

    op: Op
    stage: int
    microbatch: int

    def __post_init__(self) -> None:
        if self.stage < 0 or self.microbatch < 0:
            raise ScheduleError(
                f"action {self.op}{self.stage}.{self.microbatch}: stage and microbatch must be >= 0"
            )

    def __str__(self) -> str:
        return f"{self.op.value}{self.stage}.{self.microbatch}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @classmethod
    def parse(cls, text: str) -> Action:
        """Inverse of `str`: `Action.parse("I2.5") == Action(Op.I, 2, 5)`."""
        match = _ACTION_RE.match(text.strip())
        if match is None:
            raise ScheduleError(
                f"cannot parse action {text!r}: expected OP STAGE . MICROBATCH, "
                "with OP one of F, B, I, W, STEP, SEND_F, RECV_F, SEND_B, RECV_B, UNSHARD, RESHARD, "
                "REDUCE_GRAD (e.g. 'F3.7')"
            )
        return cls(Op(match["op"]), int(match["stage"]), int(match["microbatch"]))


class WeightUpdate(str, Enum):
    """How weights change during one call of the schedule."""

    FLUSH = "flush"
    """Synchronous: all micro-batches see the same weights; equals one large batch."""
    STASH = "stash"
    """PipeDream: every backward is followed by an update; a micro-batch's backward uses
    the weights its forward saw (stashed)."""
    DOUBLE_BUFFER = "double-buffer"
    """PipeDream-2BW: updates every few micro-batches; at most two weight versions live."""

    def __str__(self) -> str:
        return self.value


def contiguous_placement(num_ranks: int) -> tuple[int, ...]:
    """One stage per rank: stage s on rank s."""
    return tuple(range(num_ranks))


def looped_placement(num_ranks: int, num_virtual: int) -> tuple[int, ...]:
    """Megatron's interleaved layout: stage s on rank s mod P (rank r owns r, r+P, r+2P, …)."""
    return tuple(stage % num_ranks for stage in range(num_ranks * num_virtual))


def v_placement(num_ranks: int, num_virtual: int = 2) -> tuple[int, ...]:
    """Zig-zag layout: stages go down the ranks, then back up, and so on.

    With two stages per rank (the V of ZB-V and DualPipeV) rank r owns stages r and
    2P-1-r, so rank 0 holds both the first and the last stage.
    """
    placement = []
    for stage in range(num_ranks * num_virtual):
        chunk, offset = divmod(stage, num_ranks)
        placement.append(offset if chunk % 2 == 0 else num_ranks - 1 - offset)
    return tuple(placement)


@dataclass(frozen=True)
class Schedule:
    """Per-rank ordered actions for one call (one global batch) of a pipeline.

    `actions[rank]` holds compute actions (F, B, I, W, STEP) and, under full sharding, the
    sharding actions `add_sharding` inserts (UNSHARD, RESHARD, REDUCE_GRAD); point-to-point
    communication is derived by `pipefold.schedule.lower`.
    """

    name: str
    num_ranks: int
    num_stages: int
    num_microbatches: int
    placement: tuple[int, ...]
    actions: tuple[tuple[Action, ...], ...]
    weight_update: WeightUpdate = WeightUpdate.FLUSH
    _stages_of_rank: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ScheduleError(f"num_ranks must be >= 1; got {self.num_ranks}")
        if self.num_microbatches < 1:
            raise ScheduleError(f"num_microbatches must be >= 1; got {self.num_microbatches}")
        if len(self.placement) != self.num_stages:
            raise ScheduleError(
                f"placement has {len(self.placement)} entries but num_stages is {self.num_stages}: "
                "give one owning rank per stage"
            )
        for stage, rank in enumerate(self.placement):
            if not 0 <= rank < self.num_ranks:
                raise ScheduleError(
                    f"placement[{stage}] = {rank} is not a rank in 0..{self.num_ranks - 1}"
                )
        if len(self.actions) != self.num_ranks:
            raise ScheduleError(
                f"actions has {len(self.actions)} rank rows but num_ranks is {self.num_ranks}"
            )
        owned = tuple(
            tuple(stage for stage, owner in enumerate(self.placement) if owner == rank)
            for rank in range(self.num_ranks)
        )
        object.__setattr__(self, "_stages_of_rank", owned)

    @property
    def num_virtual(self) -> int:
        """Stages per rank (1 unless interleaved or V-shaped)."""
        return self.num_stages // self.num_ranks

    def rank_of(self, stage: int) -> int:
        return self.placement[stage]

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """The stages a rank owns, in model order."""
        return self._stages_of_rank[rank]

    def iter_actions(self) -> Iterator[tuple[int, int, Action]]:
        """Yield (rank, position, action) for every action."""
        for rank, row in enumerate(self.actions):
            for position, action in enumerate(row):
                yield rank, position, action

    def __str__(self) -> str:
        return format_grid(self.actions)


def format_grid(
    rows: tuple[tuple[Action, ...], ...] | list[list[Action]],
    mark: tuple[int, int] | None = None,
) -> str:
    """Draw per-rank action lists as an aligned rank x step grid.

    `mark=(rank, position)` brackets one cell, so an error can point at it.
    """
    cells = [[str(action) for action in row] for row in rows]
    if mark is not None:
        rank, position = mark
        if 0 <= rank < len(cells) and 0 <= position < len(cells[rank]):
            cells[rank][position] = f"[{cells[rank][position]}]"
    width = max((len(cell) for row in cells for cell in row), default=1)
    num_columns = max((len(row) for row in cells), default=0)
    label_width = len(f"rank {len(cells) - 1}")
    header = " " * label_width + " " + " ".join(f"{c:<{width}}" for c in range(num_columns))
    lines = [header.rstrip()]
    for rank, row in enumerate(cells):
        label = f"rank {rank}".ljust(label_width)
        lines.append((label + " " + " ".join(f"{cell:<{width}}" for cell in row)).rstrip())
    return "\n".join(lines)
