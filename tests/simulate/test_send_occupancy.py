"""A priced send occupies its sender: `CostModel.send_overhead` + `send_seconds_per_byte` x the
boundary's message bytes after an action whose output goes to another rank (an F to the next
stage, a B or I to the previous one), nothing after any other action; unpriced, as before."""

from __future__ import annotations

import pytest

from pipefold.errors import CostModelError
from pipefold.schedule import Action, Op, build
from pipefold.simulate import CostModel, simulate
from pipefold.simulate.compiled import CompiledSchedule
from pipefold.simulate.costs import sent_boundary

OVERHEAD = 0.01
SEND = 0.25
PER_BYTE = 1e-4


def _costs(num_stages: int, send: float = SEND, per_byte: float = PER_BYTE) -> CostModel:
    return CostModel.from_lists([1.0] * num_stages, [0.6] * num_stages, [0.4] * num_stages,
                                message_bytes=[1000 * (s + 1) for s in range(num_stages - 1)],
                                action_overhead=OVERHEAD, send_overhead=send, send_seconds_per_byte=per_byte)


def test_sent_boundary_follows_the_output() -> None:
    placement = (0, 1, 1, 0)  # a V: stages 1 and 2 on one rank
    assert sent_boundary(Action(Op.F, 0, 0), placement) == 0
    assert sent_boundary(Action(Op.F, 1, 0), placement) == -1  # to stage 2, the same rank
    assert sent_boundary(Action(Op.F, 2, 0), placement) == 2
    assert sent_boundary(Action(Op.F, 3, 0), placement) == -1  # the last stage sends nothing
    assert sent_boundary(Action(Op.B, 3, 0), placement) == 2
    assert sent_boundary(Action(Op.I, 1, 0), placement) == 0
    assert sent_boundary(Action(Op.B, 2, 0), placement) == -1
    assert sent_boundary(Action(Op.B, 0, 0), placement) == -1  # the first stage's gradient goes nowhere
    assert sent_boundary(Action(Op.W, 3, 0), placement) == -1


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "zb-h1", "interleaved-1f1b", "zb-v", "dualpipe-v"])
def test_send_charged_only_after_crossing_actions(name: str) -> None:
    schedule = build(name, num_ranks=2, num_microbatches=4)
    costs = _costs(schedule.num_stages)
    timeline = simulate(schedule, costs)
    waited = {(w.rank, w.waiting_for) for row in timeline.waits for w in row}
    crossing = kept = 0
    for rank, row in enumerate(timeline.events):
        for before, after in zip(row, row[1:], strict=False):
            if (rank, after.action) in waited:
                continue  # it waited for an input: the gap is the wait's
            boundary = sent_boundary(before.action, schedule.placement)
            charged = OVERHEAD + (SEND + PER_BYTE * costs.message_bytes[boundary] if boundary >= 0 else 0.0)
            assert after.start - before.end == pytest.approx(charged, abs=1e-12)
            crossing += boundary >= 0
            kept += boundary < 0
    assert crossing and kept
    # The compiled schedule times the same floats.
    assert CompiledSchedule(schedule).run(costs).makespan == timeline.makespan


def test_send_delays_the_sender_not_the_message() -> None:
    # GPipe, 2 ranks, 2 micro-batches: rank 0's second F starts after the first's send; rank 1's
    # first F starts when the message arrives (link free), as without the send.
    schedule = build("gpipe", num_ranks=2, num_microbatches=2)
    timeline = simulate(schedule, _costs(2))
    starts = {event.action: event.start for row in timeline.events for event in row}
    occupied = OVERHEAD + SEND + PER_BYTE * 1000
    assert starts[Action(Op.F, 0, 1)] == pytest.approx(1.0 + occupied)
    assert starts[Action(Op.F, 1, 0)] == pytest.approx(1.0)
    assert simulate(schedule, _costs(2, 0.0, 0.0)).makespan < timeline.makespan


def test_unpriced_sends_time_as_before_and_read_from_old_files() -> None:
    schedule = build("zb-v", num_ranks=2, num_microbatches=4)
    unpriced = _costs(schedule.num_stages, 0.0, 0.0)
    data = unpriced.to_json()
    assert "send_overhead" not in data and "send_seconds_per_byte" not in data  # an old file's fields
    again = CostModel.from_json(data)
    assert again == unpriced and not again.prices_sends
    assert simulate(schedule, again).makespan == simulate(schedule, unpriced).makespan
    priced = _costs(schedule.num_stages)
    assert CostModel.from_json(priced.to_json()) == priced


def test_negative_send_refused_with_the_field() -> None:
    with pytest.raises(CostModelError, match="send_seconds_per_byte"):
        _costs(2, per_byte=-1.0)
