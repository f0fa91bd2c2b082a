"""The end-of-step row: every field survives pack -> unpack exactly."""

import pytest
import torch

from pipefold.errors import PipelineError
from pipefold.runtime import step_gather
from pipefold.runtime.step_gather import RankRecord, host_code
from pipefold.schedule import Action, Op
from pipefold.timeline import Event, Timeline, Wait


def _record(rank: int, num_events: int, peak: int) -> RankRecord:
    ops = [Op.F, Op.B, Op.I, Op.W, Op.STEP]
    events = tuple(
        Event(rank, Action(ops[i % len(ops)], rank + 2 * (i % 2), i), 0.001 * i + 1e-7, 0.001 * i + 0.0005)
        for i in range(num_events)
    )
    waits = (Wait(rank, Action(Op.F, rank, 3), 0.0123456789, 0.0234567891),)
    return RankRecord(events, waits, peak, 2, 12345.678901234, host_code("node-a"))


def test_round_trip_is_exact_and_losses_sum():
    num_slots, num_microbatches = 7, 3
    records = [_record(0, 5, 2**40 + 3), _record(1, 7, 17)]
    losses = [torch.zeros(3, dtype=torch.float64), torch.tensor([0.25, 1 / 3, 2.0], dtype=torch.float64)]
    rows = [step_gather.pack(r, loss, num_slots) for r, loss in zip(records, losses, strict=True)]
    assert all(row.numel() == step_gather.row_length(num_slots, num_microbatches) for row in rows)
    assert step_gather.unpack(rows, num_slots) == records
    summed = step_gather.losses_of(rows, num_slots, num_microbatches)
    torch.testing.assert_close(summed, losses[1], rtol=0, atol=0)


def test_float32_losses_are_widened():
    record = _record(0, 1, 0)
    row = step_gather.pack(record, torch.tensor([0.5, 0.25]), num_slots=1)
    summed = step_gather.losses_of([row], 1, 2)
    assert summed.dtype == torch.float64 and summed.tolist() == [0.5, 0.25]


def test_more_events_than_slots_is_a_bug_report():
    with pytest.raises(PipelineError, match="slots"):
        step_gather.pack(_record(0, 4, 0), torch.zeros(1), num_slots=3)


def test_host_code_tells_hosts_apart():
    assert host_code("node-a") == host_code("node-a") != host_code("node-b")


def test_gathered_step_decodes_once_and_only_when_read():
    calls = []
    timeline = Timeline(num_ranks=1, events=((),), source="measured")

    def decode() -> Timeline:
        calls.append(1)
        return timeline

    step = step_gather.GatheredStep(decode)
    assert calls == []
    assert step.timeline() is timeline and step.timeline() is timeline
    assert calls == [1]


def test_the_executors_event_table_packs_as_its_stamps():
    # The executor hands the gather its events as an array (`StepRecord.event_table`); the row
    # must be the one its stamps give. One process, two stages on one rank (a hand-off).
    from torch import nn

    from pipefold import Pipeline
    from pipefold.runtime import LayoutOptions

    layers = [nn.Linear(4, 4) for _ in range(4)]
    pipe = Pipeline(layers, loss_fn=nn.functional.mse_loss, schedule="interleaved-1f1b", num_microbatches=4,
                    num_virtual=2, layout=LayoutOptions(partition=[2, 2]))
    seen = []
    run = pipe.executor.run
    pipe.executor.run = lambda *args, **kwargs: seen.append(run(*args, **kwargs)) or seen[-1]  # type: ignore[method-assign]
    pipe.step(torch.randn(8, 4), torch.randn(8, 4))
    (record,) = seen
    assert record.event_table is not None and len(record.event_stamps) == 16
    expected = [(step_gather.op_code(action.op), action.stage, action.microbatch, start, end)
                for action, start, end in record.event_stamps]
    assert record.event_table.tolist() == [list(row) for row in expected]
    kwargs = dict(activation_bytes_peak=1, weight_versions_peak=1, origin=2.0, host=3,
                  losses=torch.zeros(4, dtype=torch.float64), num_slots=40)
    with_table = step_gather.pack_stamps(record.event_stamps, record.wait_stamps,
                                         event_table=record.event_table, **kwargs)
    assert torch.equal(with_table, step_gather.pack_stamps(record.event_stamps, record.wait_stamps, **kwargs))


def test_a_fused_actions_event_ends_at_its_compute():
    # A compute action that sends from its handler: its event ends where its compute did, not
    # after the send (the loop's end stamp).
    from types import SimpleNamespace

    import numpy as np

    from pipefold.runtime.executor import Executor

    fake = SimpleNamespace(
        _starts=[0.0, 10.0, 20.0, 30.0], _ends=[0.0, 15.0, 26.0, 38.0], _compute_ends=[0.0, 0.0, 24.0, 0.0],
        _fused_index=np.array([2]), _timed_codes=np.array([1, 2, 3]),
        _timed_fields=np.array([[0.0, 0, 0], [1.0, 0, 0], [0.0, 0, 1]]),
    )
    table = Executor._event_table(fake, 10.0)  # type: ignore[arg-type]
    assert table[:, 3].tolist() == [0.0, 10.0, 20.0] and table[:, 4].tolist() == [5.0, 14.0, 28.0]
