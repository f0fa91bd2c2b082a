"""Seeded dropout (pipefold.model.dropout) and the built-in GPT's unfused attention, on one process:
masks are a function of the key, recomputation replays them, and an unfused block keeps what
the planner's `--megatron` model (Korthikanti et al. 2022) prices. (Pipelines against one
process: tests/runtime/test_vocab_parallel.py.)"""

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from pipefold.errors import ConfigError
from pipefold.model import build_reference
from pipefold.model.dropout import (
    SeededDropout,
    dropout_key,
    dropout_scope,
    dropout_steps,
    enter_microbatch,
    replay_scope,
    replica_seed,
)
from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.model.zoo.gpt import DecoderBlock


def _draw(module, x, **key):
    with dropout_scope(**key):
        return module(x)


def test_a_mask_is_a_function_of_its_key_and_drops_about_p():
    drop = SeededDropout(0.25, layer=2, site=1)
    x = torch.ones(64, 64)
    key = {"seed": 1, "step": 3, "microbatch": 2}
    first = _draw(drop, x, **key)
    assert torch.equal(first, _draw(drop, x, **key))
    for other in ({**key, "seed": 2}, {**key, "step": 4}, {**key, "microbatch": 1}):
        assert not torch.equal(first, _draw(drop, x, **other)), other
    assert not torch.equal(first, _draw(SeededDropout(0.25, layer=3, site=1), x, **key))
    assert not torch.equal(first, _draw(SeededDropout(0.25, layer=2, site=2), x, **key))
    kept = (first != 0).float().mean().item()
    assert 0.70 < kept < 0.80
    torch.testing.assert_close(first[first != 0], torch.full_like(first[first != 0], 1 / 0.75))
    # Outside any scope: torch's global generator, so two calls differ; in eval: the identity.
    assert not torch.equal(drop(x), drop(x))
    assert torch.equal(drop.eval()(x), x)
    assert len({dropout_key(0, 0, 0, layer, site) for layer in range(50) for site in range(4)}) == 200


def test_data_parallel_replicas_draw_masks_of_their_own():
    # Replica 0 keeps the run's seed (a run without data parallelism is unchanged); every other
    # replica holds other rows and must not share their masks.
    assert replica_seed(7, 0) == 7
    seeds = {replica_seed(7, replica) for replica in range(8)}
    assert len(seeds) == 8
    drop, x = SeededDropout(0.5, layer=0, site=0), torch.ones(32, 32)
    key = {"step": 0, "microbatch": 0}
    assert not torch.equal(_draw(drop, x, seed=replica_seed(7, 0), **key),
                           _draw(drop, x, seed=replica_seed(7, 1), **key))


def test_the_pipeline_step_counter_and_the_micro_batch_scope_give_the_key():
    drop = SeededDropout(0.5, layer=1, site=0)
    x = torch.ones(32, 32)
    saved = (dropout_steps.seed, dropout_steps.step)
    try:
        dropout_steps.start_at(5, 7)
        assert dropout_steps.next_step() == 7
        outer = enter_microbatch(3)
        try:
            drawn = drop(x)
        finally:
            enter_microbatch(outer)
        assert torch.equal(drawn, _draw(drop, x, seed=5, step=7, microbatch=3))
        assert dropout_steps.next_step() == 8
    finally:
        dropout_steps.start_at(saved[0], 0)


def test_the_backward_uses_the_forward_mask_and_recomputation_redraws_it():
    drop = SeededDropout(0.3, layer=0, site=0)
    x = torch.randn(16, 16, requires_grad=True)
    with dropout_scope(seed=0, step=0, microbatch=0):
        y = drop(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, (y != 0).float() / 0.7)
    # A checkpointed forward run again in the backward, outside the scope, draws the same mask.
    with dropout_scope(seed=0, step=0, microbatch=0):
        z = torch.utils.checkpoint.checkpoint(lambda v: drop(v * 2), x, use_reentrant=False,
                                              context_fn=replay_scope)
    (recomputed,) = torch.autograd.grad(z.sum(), x)
    torch.testing.assert_close(recomputed, 2 * grad)


def test_an_unfused_gpt_without_dropout_is_the_fused_one():
    kwargs = {"seed": 3}
    fused = build_reference(gpt_layers(64, 32, 4, 2, 16), **kwargs)
    unfused = build_reference(gpt_layers(64, 32, 4, 2, 16, attention="unfused"), **kwargs)
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unfused(ids), fused(ids), rtol=1e-5, atol=1e-5)
    assert [name for name, _ in unfused.named_parameters()] == [name for name, _ in fused.named_parameters()]


def test_selective_recomputation_of_an_unfused_core_with_dropout_is_exact():
    def run(selective):
        torch.manual_seed(0)
        block = DecoderBlock(32, 4, 2, 0.2, attention="unfused", layer=2)
        block.attn.recompute_core = selective
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with dropout_scope(seed=0, step=1, microbatch=0):
            y = block(x)
        return y.detach(), torch.autograd.grad(y.square().sum(), [x, *block.parameters()])

    (y_none, grads_none), (y_sel, grads_sel) = run(False), run(True)
    torch.testing.assert_close(y_sel, y_none)
    for selective, plain in zip(grads_sel, grads_none, strict=True):
        torch.testing.assert_close(selective, plain)


def test_an_unfused_gpt_trains_on_one_process_with_its_masks():
    layers = gpt_layers(64, 32, 4, 2, 16, dropout=0.1, attention="unfused")
    model = build_reference(layers, seed=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with dropout_scope(seed=0, step=0, microbatch=0):
        loss = gpt_loss(model(ids), ids)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"attention": "flash"}, r"gpt_layers: attention = 'flash'; use one of 'fused', 'unfused'"),
        ({"dropout": 1.0, "attention": "unfused"}, r"dropout must be in \[0, 1\); got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\); got -0.1"),
    ],
)
def test_bad_values_are_refused_with_the_field_and_the_fix(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        gpt_layers(64, 32, 4, 2, 16, **kwargs)


def test_seeded_dropout_refuses_a_probability_outside_0_1():
    with pytest.raises(ConfigError, match=r"p = 1.5; use a probability in \[0, 1\)"):
        SeededDropout(1.5, 0, 0)


def _kept(block, rows, seq, dim, *, selective):
    from pipefold.runtime.memory import ActivationCounter

    block.attn.recompute_core = selective
    counter = ActivationCounter(block.parameters())
    x = torch.randn(rows, seq, dim, requires_grad=True)
    with counter.counting(), dropout_scope(seed=0, step=0, microbatch=0):
        y = block(x)
    kept = counter.current
    del y  # held until counted: its graph holds what the block saved
    return kept


@pytest.mark.parametrize("selective", [False, True])
def test_an_unfused_block_keeps_what_plan_megatron_prices(selective):
    """GptEstimate(megatron=True).block_activation_bytes (fp32, 1-byte masks) against the bytes an
    unfused block with dropout keeps: equal but for the two layer norms' mean and 1/std (fp32,
    per token), which Korthikanti et al.'s count leaves out."""
    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.hardware import load_hardware

    rows, seq, dim, heads = 3, 32, 64, 4
    estimate = GptEstimate(num_layers=1, d_model=dim, num_heads=heads, seq_len=seq, vocab_size=256,
                           hardware=load_hardware("cpu"), dtype="fp32", megatron=True,
                           recompute_attention=selective)
    block = DecoderBlock(dim, heads, 1, 0.1, attention="unfused", layer=2)
    kept = _kept(block, rows, seq, dim, selective=selective)
    layer_norm_statistics = 2 * 2 * rows * seq * 4
    assert kept == estimate.block_activation_bytes(rows, 1, False) + layer_norm_statistics


def test_the_unfused_core_is_the_fused_one_without_dropout():
    from pipefold.model.zoo.gpt import _unfused_core

    q, k, v = torch.randn(3, 2, 4, 8, 16).unbind(0)
    torch.testing.assert_close(_unfused_core(q, k, v, torch.nn.Identity()),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_each_heads_mask_is_keyed_by_its_global_index():
    """What a tensor-parallel rank holding heads [first, first + n) draws is the one-process
    masks of those heads, for any split of the heads."""
    drop = SeededDropout(0.4, layer=2, site=1, head_dim=1)
    probs = torch.ones(3, 8, 5, 5)
    key = {"seed": 1, "step": 0, "microbatch": 2}
    whole = _draw(drop, probs, **key)
    for num_ranks in (2, 4, 8):
        width = 8 // num_ranks
        for rank in range(num_ranks):
            heads = slice(rank * width, (rank + 1) * width)
            with dropout_scope(**key):
                part = drop(probs[:, heads], first_head=rank * width)
            assert torch.equal(part, whole[:, heads]), (num_ranks, rank)
    # Heads draw masks of their own, and the keep rate is about 1 - p.
    assert len({tuple(whole[:, head].flatten().tolist()) for head in range(8)}) == 8
    assert 0.5 < (whole != 0).float().mean().item() < 0.7


def test_a_sequence_slice_draws_its_slice_of_the_whole_mask_and_keeps_only_it():
    drop = SeededDropout(0.5, layer=3, site=2)
    x = torch.randn(2, 8, 6, requires_grad=True)
    key = {"seed": 4, "step": 1, "microbatch": 0}
    whole = _draw(drop, x, **key)
    for num_ranks in (2, 4):
        length = 8 // num_ranks
        for rank in range(num_ranks):
            drop.sequence_shard = (1, rank, num_ranks)
            part = _draw(drop, x[:, rank * length:(rank + 1) * length], **key)
            torch.testing.assert_close(part, whole[:, rank * length:(rank + 1) * length])
            mask = part.grad_fn.saved_tensors[0]  # what the backward keeps: the slice's bytes only
            assert mask.shape == (2, length, 6) and mask.dtype == torch.bool
            assert mask.untyped_storage().nbytes() == 2 * length * 6
    drop.sequence_shard = None
    # A recomputation of a slice redraws it.
    drop.sequence_shard = (1, 1, 2)
    with dropout_scope(**key):
        y = torch.utils.checkpoint.checkpoint(drop, x[:, 4:], use_reentrant=False, context_fn=replay_scope)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad[:, 4:], (whole[:, 4:] != 0).float() * 2)
    assert not grad[:, :4].any()


def test_unfused_attention_probabilities_are_dropped_per_head():
    """An unfused block draws the probabilities' masks per head: a block holding heads 2 and 3
    of 4 (what tp rank 1 of 2 holds) sees the same masks as the whole block for them."""
    block = DecoderBlock(16, 4, 2, 0.5, attention="unfused", layer=2)
    seen = []
    block.attn.attention_dropout.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 6, 16)
    with dropout_scope(seed=0, step=0, microbatch=0):
        block(x)
    (probs,) = seen
    assert probs.shape == (2, 4, 6, 6)
    drop = SeededDropout(0.5, layer=2, site=1, head_dim=1)
    ones = torch.ones(2, 2, 6, 6)
    with dropout_scope(seed=0, step=0, microbatch=0):
        masks = drop(ones, first_head=2) != 0
    causal = torch.ones(6, 6, dtype=torch.bool).tril()  # softmax is positive there: zero = dropped
    assert torch.equal((probs[:, 2:] != 0) & causal, masks & causal)
