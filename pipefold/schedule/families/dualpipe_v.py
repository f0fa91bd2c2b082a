"""DualPipeV (DeepSeek-V3, 2024; torch's ScheduleDualPipeV): DualPipe cut in half, in a V."""

from __future__ import annotations

from collections import deque

from pipefold.schedule.families._common import (
    KIND_B,
    KIND_F,
    KIND_I,
    KIND_W,
    IntRow,
    actions_of,
    drop_microbatches,
    make_schedule,
    require_virtual,
)
from pipefold.schedule.family import Family
from pipefold.schedule.ir import Schedule, v_placement


class _RankBuilder:
    """Emits one rank's order as integers, numbering micro-batches per (stage, kind) in emission order.

    A full backward B and an input backward I share one counter per stage: they are
    two ways of running the same micro-batch's backward.
    """

    def __init__(self) -> None:
        self.kinds: list[int] = []
        self.stages: list[int] = []
        self.microbatches: list[int] = []
        self._next: dict[tuple[int, int], int] = {}
        self._pending_weights: deque[tuple[int, int]] = deque()

    def _emit(self, kind: int, stage: int, microbatch: int) -> None:
        self.kinds.append(kind)
        self.stages.append(stage)
        self.microbatches.append(microbatch)

    def _take(self, kind: int, stage: int) -> int:
        microbatch = self._next.get((kind, stage), 0)
        self._next[(kind, stage)] = microbatch + 1
        return microbatch

    def forward(self, stage: int) -> None:
        self._emit(KIND_F, stage, self._take(KIND_F, stage))

    def backward(self, stage: int, split: bool) -> None:
        microbatch = self._take(KIND_B, stage)
        if split:
            self._emit(KIND_I, stage, microbatch)
            self._pending_weights.append((stage, microbatch))
        else:
            self._emit(KIND_B, stage, microbatch)

    def weight_if_pending(self) -> None:
        if self._pending_weights:
            self._emit(KIND_W, *self._pending_weights.popleft())


def rank_order(num_ranks: int, num_microbatches: int, rank: int) -> IntRow:
    """torch's ScheduleDualPipeV order for `rank` (needs m >= 2p), overlapped pairs as F then B, as
    integers (kinds numbered `KIND_F` ...; `pipefold.plan.fast_orders` reads them so)."""
    down, up = rank, 2 * num_ranks - 1 - rank
    emit = _RankBuilder()
    for _ in range(2 * (num_ranks - rank - 1)):
        emit.forward(down)
    for _ in range(rank + 1):
        emit.forward(down)
        emit.forward(up)
    for _ in range(num_ranks - rank - 1):
        emit.backward(up, split=True)
        emit.weight_if_pending()
        emit.forward(up)
    # Steady state: DualPipe's overlapped pairs, a forward of one stage with the
    # backward of the other, so one's compute hides the other's communication.
    for _ in range(num_microbatches - 2 * num_ranks + rank + 1):
        emit.forward(down)
        emit.backward(up, split=False)
        emit.forward(up)
        emit.backward(down, split=False)
    for _ in range(num_ranks - rank - 1):
        emit.backward(up, split=False)
        emit.forward(up)
        emit.backward(down, split=False)
    # Cool-down: the second half of the backwards split so W's fill the tail.
    num_tail = rank + 1
    split = False
    for i in range(num_tail):
        if i == num_tail // 2 and rank % 2 == 1:
            split = True
        emit.backward(up, split)
        if i == num_tail // 2 and rank % 2 == 0:
            split = True
        emit.backward(down, split)
    for _ in range(num_ranks - rank - 1):
        emit.weight_if_pending()
        emit.backward(down, split)
    for _ in range(rank + 1):
        emit.weight_if_pending()
    return emit.kinds, emit.stages, emit.microbatches


def generate(num_ranks: int, num_microbatches: int, num_virtual: int) -> Schedule:
    """DualPipeV: V placement, overlapped forward/backward pairs in steady state.

    p=2, m=4 (compute order per rank; each steady-state F directly followed by a B
    is one of DualPipe's overlapped pairs)::

        rank 0  F0.0 F0.1 F0.2 F3.0 I3.0 W3.0 F3.1 F0.3 B3.1 F3.2 B0.0 B3.2
                F3.3 B0.1 B3.3 I0.2 W0.2 I0.3 W0.3
        rank 1  F1.0 F2.0 F1.1 F2.1 F1.2 B2.0 F2.2 B1.0 F1.3 B2.1 F2.3 B1.1
                B2.2 B1.2 I2.3 I1.3 W2.3 W1.3

    torch requires m >= 2p; smaller m are generated here for 2p micro-batches and
    the extra ones removed (docs/decisions.md, "Padding"), so any m >= 1 works. Bubble with
    F = I = W per chunk and no credit for overlap: (p-1)/(6m+p-1) within one call
    once m >= 2p, as ZB-V (tested); DualPipe's gain over ZB-V is that each pair
    hides one direction's communication behind the other's compute. Memory: 2p+1
    chunks of 1/2 stage on every rank once m >= 2p, one more than ZB-V.
    """
    padded = max(num_microbatches, 2 * num_ranks)
    rows = drop_microbatches(
        (actions_of(rank_order(num_ranks, padded, rank)) for rank in range(num_ranks)), num_microbatches
    )
    return make_schedule("dualpipe-v", num_ranks, num_microbatches, v_placement(num_ranks, 2), rows)


def check(num_ranks: int, num_microbatches: int, num_virtual: int) -> None:
    require_virtual("dualpipe-v", num_virtual, 2, "use interleaved-1f1b or looped-bfs for other counts")


FAMILY = Family(
    name="dualpipe-v",
    generate=generate,
    check=check,
    summary="DualPipeV: DeepSeek's DualPipe cut in half, overlapped F/B pairs over a V",
    bubble="(p-1)/(6m+p-1) with F = I = W per chunk, once m >= 2p; pairs also overlap comm",
    memory="2p+1 chunks of 1/2 stage on every rank once m >= 2p",
    legal="any p >= 1, m >= 1 (m < 2p is padded); v = 2 exactly (V placement)",
    default_virtual=2,
)
