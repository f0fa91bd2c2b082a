"""Receive buffers are reused only when nothing else holds their storage (one process, no ranks)."""

from __future__ import annotations

import torch

from pipefold.model import TensorMeta
from pipefold.runtime.receive_buffers import ReceiveBuffers, reusable
from pipefold.runtime.stage import as_leaves


def _input_meta() -> TensorMeta:
    return TensorMeta.of((torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)))


def test_a_buffer_nothing_holds_is_handed_out_again():
    pool = ReceiveBuffers(2, 3, torch.device("cpu"))
    meta = _input_meta()
    value, buffers = pool.input(1, 2, meta)
    assert len(buffers) == 2 and [b.shape for b in buffers] == [torch.Size([2, 3]), torch.Size([2])]
    again, buffers_again = pool.input(1, 2, meta)
    assert again is value and all(a is b for a, b in zip(buffers, buffers_again, strict=True))
    # Another slot, and an equal description made anew, get their own / the kept buffers.
    other, _ = pool.input(0, 2, meta)
    assert other is not value
    assert pool.input(1, 2, _input_meta())[0] is value


def test_a_buffer_a_consumer_still_holds_is_never_handed_out():
    pool = ReceiveBuffers(1, 1, torch.device("cpu"))
    meta = TensorMeta.of(torch.zeros(4))
    value, buffers = pool.input(0, 0, meta)
    value.fill_(1.0)
    leaf = as_leaves(value)[0]  # what the stage gets: it shares the buffer's storage
    kept = leaf * 2  # noqa: F841  (a layer's graph saving nothing of the leaf)
    assert not reusable(buffers)
    fresh, _ = pool.input(0, 0, meta)
    assert fresh is not value
    fresh.fill_(5.0)
    torch.testing.assert_close(leaf.detach(), torch.ones(4))  # what the stage kept is unchanged
    view = fresh[1:]
    assert pool.input(0, 0, meta)[0] is not fresh  # a view holds it too
    del view
    assert pool.input(0, 0, meta)[0] is not None


def test_autograd_saving_the_leaf_holds_the_buffer_until_the_backward():
    pool = ReceiveBuffers(1, 1, torch.device("cpu"))
    meta = TensorMeta.of(torch.zeros(1, 3))
    value, buffers = pool.input(0, 0, meta)
    leaf = as_leaves(value)[0]
    weight = torch.randn(3, 3, requires_grad=True)
    out = (leaf @ weight).sum()  # saves `leaf` for the weight's gradient
    del leaf
    assert not reusable(buffers)
    out.backward()
    del out
    assert reusable(buffers)
    assert pool.input(0, 0, meta)[0] is value


def test_output_gradients_skip_what_is_not_differentiable_and_differ_by_description():
    pool = ReceiveBuffers(1, 1, torch.device("cpu"))
    meta = _input_meta()
    grads, buffers = pool.output_grads(0, 0, meta)
    assert grads[1] is None and len(buffers) == 1 and buffers[0] is grads[0]
    assert pool.output_grads(0, 0, meta)[0] is grads
    wider = TensorMeta.of((torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64)))
    assert pool.output_grads(0, 0, wider)[1][0].shape == torch.Size([2, 4])


def test_no_reuse_where_streams_could_race():
    pool = ReceiveBuffers(1, 1, torch.device("meta"))
    meta = TensorMeta.of(torch.zeros(2))
    first, _ = pool.input(0, 0, meta)
    assert pool.input(0, 0, meta)[0] is not first
