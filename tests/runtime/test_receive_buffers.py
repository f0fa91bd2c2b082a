"""Receive buffers are reused only when nothing else holds them (one process, no ranks)."""

from __future__ import annotations

import weakref

import torch

from pipefold.model import TensorMeta
from pipefold.runtime.receive_buffers import ReceiveBuffers
from pipefold.runtime.stage import as_leaves


def _input_meta() -> TensorMeta:
    return TensorMeta.of((torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)))


def test_a_buffer_nothing_holds_is_handed_out_again():
    pool = ReceiveBuffers(2, 3, torch.device("cpu"))
    meta = _input_meta()
    value, buffers, _ = pool.input(1, 2, meta)
    assert len(buffers) == 2 and [b.shape for b in buffers] == [torch.Size([2, 3]), torch.Size([2])]
    kept = [weakref.ref(b) for b in buffers]
    del value, buffers
    _, again, _ = pool.input(1, 2, meta)
    assert all(a is k() for a, k in zip(again, kept, strict=True))
    del again
    # Another slot gets its own; an equal description made anew gets the kept buffers.
    assert pool.input(0, 2, meta)[1][0] is not kept[0]()
    assert pool.input(1, 2, _input_meta())[1][0] is kept[0]()
    # Another description never gets them.
    wider = TensorMeta.of((torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64)))
    assert pool.input(1, 2, wider)[1][0].shape == torch.Size([2, 4])


def test_a_buffer_a_consumer_still_holds_is_never_handed_out():
    pool = ReceiveBuffers(1, 1, torch.device("cpu"))
    meta = TensorMeta.of(torch.zeros(4))
    value, _, _ = pool.input(0, 0, meta)
    value.fill_(1.0)
    leaf = as_leaves(value)[0]  # what the stage gets: it shares the buffer's storage
    first = weakref.ref(value)
    del value, _
    fresh, _, _ = pool.input(0, 0, meta)
    assert fresh is not first()
    fresh.fill_(5.0)
    torch.testing.assert_close(leaf.detach(), torch.ones(4))  # what the stage held is unchanged
    view = fresh[1:]
    second = weakref.ref(fresh)
    del fresh, _
    assert pool.input(0, 0, meta)[0] is not second()  # a view holds it too
    del view, leaf


def test_a_gradient_a_hook_kept_is_never_handed_out():
    """Autograd hands a received gradient to hooks as the buffer's own tensor object."""
    pool = ReceiveBuffers(1, 1, torch.device("cpu"))
    meta = TensorMeta.of(torch.zeros(1, 3))
    kept = []
    weight = torch.randn(3, 3, requires_grad=True)
    for fill in (1.0, 2.0):
        grads, _, _ = pool.output_grads(0, 0, meta)
        grads[0].fill_(fill)
        out = torch.ones(1, 3) @ weight
        out.register_hook(kept.append)
        torch.autograd.backward([out], [grads[0]])
        del grads, _, out
    assert kept[0] is not kept[1]
    torch.testing.assert_close(kept[0], torch.full((1, 3), 1.0))


def test_autograd_saving_the_leaf_holds_the_buffer_until_the_backward():
    pool = ReceiveBuffers(1, 1, torch.device("cpu"))
    meta = TensorMeta.of(torch.zeros(1, 3))
    value, _, _ = pool.input(0, 0, meta)
    leaf = as_leaves(value)[0]
    first = weakref.ref(value)
    del value, _
    weight = torch.randn(3, 3, requires_grad=True)
    out = (leaf @ weight).sum()  # saves `leaf` for the weight's gradient
    del leaf
    held, _, _ = pool.input(0, 0, meta)
    assert held is not first()
    del held, _
    # The pool now keeps the second buffer; once the first's graph is gone, the second serves.
    out.backward()
    del out
    second = weakref.ref(pool.input(0, 0, meta)[0])
    assert pool.input(0, 0, meta)[0] is second()


def test_output_gradients_skip_what_is_not_differentiable():
    pool = ReceiveBuffers(1, 1, torch.device("cpu"))
    meta = _input_meta()
    grads, buffers, _ = pool.output_grads(0, 0, meta)
    assert grads[1] is None and len(buffers) == 1 and buffers[0] is grads[0]
    first = weakref.ref(grads[0])
    del grads, buffers
    assert pool.output_grads(0, 0, meta)[0][0] is first()


def test_no_reuse_where_streams_could_race():
    pool = ReceiveBuffers(1, 1, torch.device("meta"))
    meta = TensorMeta.of(torch.zeros(2))
    pool.input(0, 0, meta)
    pool.output_grads(0, 0, meta)
    assert pool._inputs[0][0] is None and pool._grads[0][0] is None  # nothing kept to reuse


def test_a_kept_buffer_comes_with_byte_views_of_its_own_memory():
    pool = ReceiveBuffers(1, 1, torch.device("cpu"))
    meta = _input_meta()
    value, buffers, views = pool.input(0, 0, meta)
    assert views is not None and len(views) == len(buffers)
    for buffer, view in zip(buffers, views, strict=True):
        view[:] = bytes(range(len(view)))
        assert bytes(buffer.view(torch.uint8).reshape(-1).tolist()) == bytes(range(len(view)))
    del value, buffers
    _, again, views_again = pool.input(0, 0, meta)
    assert views_again is views  # handed out again with the buffers
    grads, grad_buffers, grad_views = pool.output_grads(0, 0, meta)
    assert grads[1] is None and len(grad_buffers) == 1  # the int64 output has no gradient
    assert grad_views is not None and len(grad_views[0]) == grad_buffers[0].nbytes
