"""Shared-memory channels (pipefold.runtime.transport.shm), both ends in this one process."""

from __future__ import annotations

import pytest
import torch

from pipefold.errors import PipelineError
from pipefold.runtime.transport.shm import (
    BYTE_VIEW_MAX_BYTES,
    ShmChannel,
    byte_view,
    layout,
    new_token,
    shm_supported,
)

pytestmark = pytest.mark.skipif(not shm_supported(), reason="shared-memory channels need x86-64 Linux")


@pytest.fixture
def pair(tmp_path):
    token = new_token()
    sender = ShmChannel.create(tmp_path, "channel", 4096, token)
    receiver = ShmChannel.open(tmp_path, "channel", 4096, token)
    assert receiver is not None
    sender.unlink()
    yield sender, receiver
    sender.close()
    receiver.close()


def test_layout_aligns_every_tensor_to_64_bytes():
    assert layout([10, 64, 1], start=0) == ([0, 64, 128], 129)
    assert layout([8], start=129) == ([192], 200)
    assert layout([], start=5) == ([], 5)


def test_messages_arrive_in_order_with_their_dtypes(pair):
    sender, receiver = pair
    first = (torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor([True, False]))
    second = (torch.arange(5, dtype=torch.int64),)
    total = layout([24, 2], 0)[1]
    total = layout([40], total)[1]
    sender.begin_step(total)
    receiver.begin_step(total)
    assert sender.active and receiver.active
    buffers_1 = (torch.empty(2, 3), torch.empty(2, dtype=torch.bool))
    buffers_2 = (torch.empty(5, dtype=torch.int64),)
    claim_1 = receiver.claim(buffers_1)
    claim_2 = receiver.claim(buffers_2)
    assert not receiver.ready(claim_1[0])
    sender.send(first)
    assert receiver.ready(claim_1[0]) and not receiver.ready(claim_2[0])
    sender.send(second)
    # Consumed out of posting order, as two stages of one receiver may do.
    receiver.read(claim_2[0], buffers_2, claim_2[1])
    receiver.read(claim_1[0], buffers_1, claim_1[1])
    torch.testing.assert_close(buffers_1, first)
    torch.testing.assert_close(buffers_2, second)
    assert sender.all_consumed()
    sender.begin_step(total)  # the next step starts again at offset 0
    receiver.begin_step(total)
    claim = receiver.claim(buffers_2)
    sender.send((torch.full((5,), 7, dtype=torch.int64),))
    assert not sender.all_consumed()
    receiver.read(claim[0], buffers_2, claim[1])
    assert sender.all_consumed()
    assert buffers_2[0].tolist() == [7] * 5


def test_a_receive_into_byte_views_gets_every_byte_and_marks_it_consumed(pair):
    sender, receiver = pair
    sent = (torch.randn(3, 5), torch.arange(7, dtype=torch.int16), torch.randn(2, dtype=torch.bfloat16))
    total = layout([t.nbytes for t in sent], 0)[1]
    for _step in range(2):  # the second step's bytes land in the same slots and are read anew
        sender.begin_step(total)
        receiver.begin_step(total)
        buffers = tuple(torch.empty_like(t) for t in sent)
        views = tuple(byte_view(b) for b in buffers)
        assert all(v is not None and len(v) == b.nbytes for v, b in zip(views, buffers, strict=True))
        sequence, offsets, _ = receiver.claim(buffers)
        sender.send(sent)
        assert not sender.all_consumed()
        receiver.read_bytes(sequence, views, offsets)  # type: ignore[arg-type]
        assert sender.all_consumed()
        for got, want in zip(buffers, sent, strict=True):
            assert torch.equal(got, want)
        sent = tuple(t + 1 for t in sent)


def _tensor_kinds() -> tuple[torch.Tensor, ...]:
    """What a send meets besides plain dense tensors: a transposed, lazily negated or conjugated
    view, a Parameter, a view with an offset, no elements, more bytes than a byte copy takes."""
    base = torch.randn(4, 6)
    return (
        base.t(),
        torch._neg_view(torch.randn(3)),
        torch.randn(2, dtype=torch.complex64).conj(),
        torch.nn.Parameter(torch.randn(5)),
        base[1:3],
        torch.zeros(0, 3),
        torch.randn(BYTE_VIEW_MAX_BYTES // 4 + 3),
    )


def test_a_send_copies_every_kind_of_tensor_exactly(tmp_path):
    # Plain dense tensors go in as bytes, everything else through a tensor copy: the receiver
    # gets the values either way (a transposed or lazily negated or conjugated view, a
    # Parameter, a view with an offset, no elements, more bytes than a byte copy takes).
    sent = (*_tensor_kinds(), torch.tensor([True, False, True]))
    total = layout([t.nbytes for t in sent], 0)[1]
    token = new_token()
    sender = ShmChannel.create(tmp_path, "kinds", total, token)
    receiver = ShmChannel.open(tmp_path, "kinds", total, token)
    assert receiver is not None
    try:
        sender.begin_step(total)
        receiver.begin_step(total)
        buffers = tuple(torch.empty(t.shape, dtype=t.dtype) for t in sent)
        sequence, offsets, _ = receiver.claim(buffers)
        sender.send(sent)
        receiver.read(sequence, buffers, offsets)
        for got, want in zip(buffers, sent, strict=True):
            assert torch.equal(got, want.detach().resolve_conj().resolve_neg())
    finally:
        sender.close()
        receiver.close()


def test_a_one_tensor_send_copies_every_kind_exactly_and_leaves_no_graph(tmp_path):
    # The one-tensor path of `send` (a stage's usual boundary) takes the same kinds, each alone,
    # and tensors that carry a graph (the executor sends outputs undetached): the channel's
    # views must not join the graph.
    leaf = torch.randn(3, requires_grad=True)
    sent = (*_tensor_kinds(), leaf * 2, (leaf * 2).t().unsqueeze(0).transpose(0, 1))
    total = layout([t.nbytes for t in sent], 0)[1]
    token = new_token()
    sender = ShmChannel.create(tmp_path, "single", total, token)
    receiver = ShmChannel.open(tmp_path, "single", total, token)
    assert receiver is not None
    try:
        sender.begin_step(total)
        receiver.begin_step(total)
        for tensor in sent:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype)
            sequence, offsets, _ = receiver.claim((buffer,))
            sender.send((tensor,))
            receiver.read(sequence, (buffer,), offsets)
            assert torch.equal(buffer, tensor.detach().resolve_conj().resolve_neg())
        assert all(view.grad_fn is None and not view.requires_grad for view in sender._views.values())
        assert sender._data.grad_fn is None and not sender._data.requires_grad
    finally:
        sender.close()
        receiver.close()


def test_byte_view_refuses_what_is_not_plain_contiguous_memory():
    assert byte_view(torch.zeros(0)) is None
    assert byte_view(torch.zeros(4, 3).t()) is None
    assert byte_view(torch.zeros(2, dtype=torch.complex64).conj()) is None
    assert byte_view(torch.zeros(BYTE_VIEW_MAX_BYTES + 1, dtype=torch.uint8)) is None
    view = byte_view(torch.zeros(3, dtype=torch.float64))
    assert view is not None and len(view) == 24


def test_a_step_larger_than_the_channel_leaves_it_inactive(pair):
    sender, receiver = pair
    sender.begin_step(4097)
    receiver.begin_step(4097)
    assert not sender.active and not receiver.active


def test_a_message_beyond_the_announced_step_is_refused(pair):
    sender, _ = pair
    sender.begin_step(64)
    with pytest.raises(PipelineError, match="announced"):
        sender.send((torch.zeros(17),))


def test_open_refuses_another_senders_file(tmp_path):
    sender = ShmChannel.create(tmp_path, "channel", 4096, new_token())
    try:
        assert ShmChannel.open(tmp_path, "channel", 4096, token=1) is None  # wrong token
        assert ShmChannel.open(tmp_path, "channel", 8192, token=1) is None  # wrong size
        assert ShmChannel.open(tmp_path, "missing", 4096, token=1) is None
    finally:
        sender.unlink()
        sender.close()
    assert list(tmp_path.iterdir()) == []
