"""The executor's precomputed per-action data agrees with what it replaces (one process, no ranks)."""

from __future__ import annotations

import pytest
import torch

from pipefold.model import TensorMeta
from pipefold.runtime.executor_parts import compute_then_send
from pipefold.runtime.executor_parts import consumer_names as _consumer_names
from pipefold.runtime.executor_parts import matches as _matches
from pipefold.schedule import Op, build, lower


@pytest.mark.parametrize(
    "outputs",
    [
        (torch.zeros(2, 3),),
        (torch.zeros(2, 4),),
        (torch.zeros(2, 3, dtype=torch.float64),),
        (torch.zeros(2, 3), torch.zeros(1)),
        (torch.zeros(3, 2),),
        (None,),
        ("not a tensor",),
    ],
)
@pytest.mark.parametrize(
    "expected",
    [
        TensorMeta.of(torch.zeros(2, 3)),
        TensorMeta.of((torch.zeros(2, 3),)),
        TensorMeta.of((torch.zeros(2, 3), torch.zeros(1))),
        TensorMeta.of((torch.zeros(2, 3), torch.zeros(1, dtype=torch.int64))),
    ],
)
def test_the_fast_output_check_never_passes_what_mismatch_refuses(expected, outputs):
    # The executor asks `mismatch` whenever `_matches` is False, so only a True here can
    # change its verdict; and the exact match, the common case, must take the fast path.
    slow = expected.mismatch(outputs if expected.is_tuple else outputs[0])
    if _matches(expected, outputs):
        assert slow is None
    exact = tuple(torch.empty(shape, dtype=dtype)
                  for shape, dtype in zip(expected.shapes, expected.dtypes, strict=True))
    assert _matches(expected, exact)


@pytest.mark.parametrize("family", ["gpipe", "1f1b", "zb-h1", "zb-v", "interleaved-1f1b"])
def test_every_receive_is_named_after_the_action_that_waits_for_it(family):
    num_virtual = 2 if family in ("zb-v", "interleaved-1f1b") else 1
    program = lower(build(family, num_ranks=2, num_microbatches=4, num_virtual=num_virtual))
    for actions in program.instructions:
        names = _consumer_names(actions)
        later = {str(a) for a in actions if a.op.is_compute}
        for action in actions:
            if action.op is Op.RECV_F:
                assert (names[(action.op, action.stage, action.microbatch)]
                        == f"F{action.stage}.{action.microbatch}")
            elif action.op is Op.RECV_B:
                name = names[(action.op, action.stage, action.microbatch)]
                assert name in later and name[0] in "BI" and name[1:] == f"{action.stage}.{action.microbatch}"


@pytest.mark.parametrize("family", ["gpipe", "1f1b", "zb-h1", "zb-v", "interleaved-1f1b", "dualpipe-v"])
def test_every_send_runs_from_the_handler_of_the_compute_it_follows(family):
    # The executor drops the entry of each send that follows its compute (the compute's handler
    # sends): every send of a lowered program must be one of those, and nothing else is fused.
    num_virtual = 1 if family in ("gpipe", "1f1b", "zb-h1") else 2
    program = lower(build(family, num_ranks=2, num_microbatches=4, num_virtual=num_virtual))
    for actions in program.instructions:
        fused = compute_then_send(actions)
        sends = [i for i, a in enumerate(actions) if a.op in (Op.SEND_F, Op.SEND_B)]
        assert sorted(i + 1 for i in fused) == sends
        for index in fused:
            compute, send = actions[index], actions[index + 1]
            assert (compute.stage, compute.microbatch) == (send.stage, send.microbatch)
            assert send.op is (Op.SEND_F if compute.op is Op.F else Op.SEND_B)
            assert compute.op in (Op.F, Op.B, Op.I)


def test_chunk_sizes_are_tensor_splits() -> None:
    from pipefold.runtime.step_batch import chunk_sizes

    for rows in range(1, 70):
        for num_chunks in range(1, rows + 1):
            expected = [len(chunk) for chunk in torch.tensor_split(torch.empty(rows), num_chunks)]
            assert chunk_sizes(rows, num_chunks) == expected


def test_seed_gives_the_scaled_losses_gradients_bit_for_bit() -> None:
    from pipefold.runtime.executor_parts import scaled_losses, seed_value

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for scale, loss_scale in ((1 / 3, 1.0), (1 / 7, 65536.0), (3 / 64, 3.0), (0.1, 1.0)):
            weight = torch.randn(5, generator=generator).to(dtype).requires_grad_()
            x = torch.randn(5, generator=generator).to(dtype)
            scaled = (weight * x).sum() * scale
            (scaled if loss_scale == 1.0 else scaled * loss_scale).backward()
            expected, weight.grad = weight.grad, None
            loss = (weight * x).sum()
            loss.backward(torch.full_like(loss, seed_value(scale, loss_scale, dtype)))
            assert torch.equal(weight.grad, expected)
            recorded = scaled_losses([loss.detach()], [scale])
            assert torch.equal(recorded[0], (loss.detach() * scale).to(torch.float64))


def test_scaled_losses_round_each_product_as_loss_times_scale() -> None:
    # float32 and float64 take one multiply of the stacked losses; other dtypes one op per loss.
    from pipefold.runtime.executor_parts import scaled_losses

    generator = torch.Generator().manual_seed(1)
    scales = [1 / 3, 1 / 64, 0.1, 7 / 1000, 2 / 3, 1.0, 5 / 11, 1 / 6]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for magnitude in (1e-30, 1e-3, 1.0, 1e4, 1e30):
            losses = [(torch.randn((), generator=generator) * magnitude).to(dtype) for _ in scales]
            expected = torch.stack([(loss * scale).to(torch.float64)
                                    for loss, scale in zip(losses, scales, strict=True)])
            assert torch.equal(scaled_losses(losses, scales), expected), (dtype, magnitude)


def test_a_shared_seed_is_read_never_written():
    # B's seed at the loss is one tensor per value (executor_parts.seed_tensor): a backward must
    # leave it as it was, even where the loss adds a parameter directly (its gradient is then
    # the seed itself, which accumulation must copy, not keep).
    from pipefold.runtime.backward import backward_full
    from pipefold.runtime.executor_parts import seed_tensor, seed_value

    weight = torch.randn(3, requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    x = torch.randn(3)
    seed = None
    for _ in range(3):
        loss = (weight * x).sum() + bias
        seed = seed_tensor(1 / 3, 1.0, loss)
        assert seed is seed_tensor(1 / 3, 1.0, loss.detach().clone())
        backward_full((loss,), (seed,), ())
        assert torch.equal(seed, torch.full_like(loss, seed_value(1 / 3, 1.0, loss.dtype)))
        assert bias.grad is not seed
    assert torch.equal(bias.grad, 3 * torch.full((), seed_value(1 / 3, 1.0, torch.float32)))
    assert seed_tensor(1 / 3, 1.0, torch.zeros(1)) is not seed  # another shape
    assert seed_tensor(1 / 3, 1.0, torch.zeros((), dtype=torch.float64)).dtype == torch.float64


def test_each_step_starts_with_the_readiness_memo_of_every_stage_ended(monkeypatch):
    """W's direct groups remember their parameters' readiness until `GroupCache.reset`
    (pipefold/runtime/backward_groups.py, `accumulate_at`); between steps anything may change a
    parameter (`param.data = ...`), so the executor ends the memo of each of its stages' caches
    when a step starts."""
    from pipefold import Pipeline
    from pipefold.model.zoo import gpt_layers, gpt_loss
    from pipefold.runtime.backward_plan import GroupCache

    ended: list[GroupCache] = []
    real = GroupCache.reset

    def reset(cache: GroupCache) -> None:
        ended.append(cache)
        real(cache)

    monkeypatch.setattr(GroupCache, "reset", reset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # One rank, two stages (zb-v): the second splits its backward into I and W.
        pipe = Pipeline(
            gpt_layers(64, 16, 2, 2, seq_len=8), loss_fn=gpt_loss, schedule="zb-v", num_microbatches=2
        )
        tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
        pipe.step(tokens, tokens)
        first = list(ended)
        pipe.step(tokens, tokens)
    finally:
        torch.set_num_threads(threads)
    # Each stage's cache at the step's start, and at its end (the memo holds the gradients it
    # checked, which the optimizer's `zero_grad` may drop), at every step.
    assert len(first) == 4 and len({id(cache) for cache in first}) == 2
    assert ended[len(first):] == first
