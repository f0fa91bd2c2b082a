"""Megatron's vocabulary-parallel embedding, head and loss, and selective (attention-core)
recomputation, against one process.

Four ranks (the session's shared pool, `WorkerPool(4, cases=__name__)`) form a ("pp", "tp") =
(2, 2) mesh: the built-in GPT with `gpt_tensor_parallel_plan(vocab_parallel=True)` runs two
steps without zeroing, and the loss and every gradient (a shard's gathered whole) equal the
same model's on one process. Single-process cases check the cross-entropy's arithmetic on a
world of one, selective recomputation of one block (exact, and what it keeps between none and
full), and the planner's activation model against what the runtime keeps.

Megatron's unfused GPT with seeded dropout (`attention="unfused"`) runs on two ranks of the
shared pool (`WorkerPool(2, cases=__name__)`, one task with every schedule): 1f1b, zb-h1 (split
backward) and interleaved 1f1b at pp2, with full, selective and no recomputation, and at pp1 x
tp2 with and without sequence parallelism, against one process drawing each micro-batch's masks
in `dropout_scope`; and on the four ranks at pp2 x tp2 (sequence and vocabulary parallelism,
recomputation) and dp2 x tp2 (each replica its own seed; replicated and fully sharded): each tp
rank's heads draw the one-process heads' masks, and a sequence slice its slice of the
one-process mask.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _workers import WorkerPool

from pipefold.errors import ConfigError
from pipefold.model import build_reference
from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.runtime import (
    LayoutOptions,
    ParallelOptions,
    Pipeline,
    RuntimeOptions,
    gpt_tensor_parallel_plan,
)

VOCAB, DIM, HEADS, SEQ = 12, 16, 4, 4


@pytest.fixture(scope="module")
def pool4():
    pool = WorkerPool(4, cases=__name__)
    yield pool
    pool.close()


def _layers(vocab: int = VOCAB, *, tie: bool = True) -> list:
    return gpt_layers(vocab, DIM, HEADS, 2, SEQ, tie_embeddings=tie)


def _batch(rows: int, seed: int, vocab: int = VOCAB):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, SEQ), generator=generator)
    return tokens, torch.randint(0, vocab, (rows, SEQ), generator=generator)


# -- rank side -------------------------------------------------------------------------------------


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))


def vocab_exact(*, schedule, tie=True, recompute="none", sequence_parallel=False, num_virtual=None):
    """pp=2 x tp=2, vocabulary-parallel: loss and every gradient against one process."""
    from torch.distributed.tensor import DTensor

    mesh = _mesh()
    plan = gpt_tensor_parallel_plan(vocab_parallel=True, sequence_parallel=sequence_parallel)
    pipe = Pipeline(
        _layers(tie=tie), loss_fn=gpt_loss, schedule=schedule, num_microbatches=4, num_virtual=num_virtual,
        layout=LayoutOptions(recompute=recompute, seed=7),
        parallel=ParallelOptions(process_group=mesh, tensor_parallel=plan),
        runtime=RuntimeOptions(timeout_s=60),
    )
    reference = build_reference(_layers(tie=tie), seed=7)
    losses = []
    for step in range(2):
        inputs, targets = _batch(8, seed=step)
        loss = pipe.step(inputs, targets)
        expected = gpt_loss(reference(inputs), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        losses.append(loss)
    expected_grads = {name: p.grad for name, p in reference.named_parameters()}
    table_rows = {}
    for name, param in pipe.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        grad = param.grad
        if isinstance(param, DTensor):
            grad = grad.full_tensor()
            if param.dim() == 2 and param.shape[0] == VOCAB:
                table_rows[name] = param.to_local().shape[0]
        torch.testing.assert_close(grad, expected_grads[name], msg=lambda m, n=name: f"{n}: {m}")
    # The gradient norm counts each tp rank's rows of the tied table once (on its first owner).
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9).item()
    assert pipe.clip_grad_norm_(1e9) == pytest.approx(expected_norm, rel=1e-5)
    cores = [m for module in pipe.local_modules.values() for m in module.modules()
             if hasattr(m, "recompute_core")]
    return {"losses": losses, "table_rows": table_rows, "pp_rank": pipe.rank,
            "recomputed_cores": sum(core.recompute_core for core in cores)}


def vocab_checkpoint(*, directory):
    """Save at pp2 x tp2 (vocabulary-split tied table) after one Adam step; load into a 4-rank
    pipeline without tensor parallelism: its weights are one process's after the same step."""
    from pipefold import load_checkpoint, save_checkpoint

    def pipeline(split):
        return Pipeline(
            _layers(), loss_fn=gpt_loss, schedule="1f1b", num_microbatches=2,
            layout=LayoutOptions(seed=7),
            parallel=ParallelOptions(
                process_group=_mesh() if split else None,
                tensor_parallel=gpt_tensor_parallel_plan(vocab_parallel=True) if split else None,
            ),
            runtime=RuntimeOptions(timeout_s=60),
        )

    inputs, targets = _batch(4, seed=0)
    reference = build_reference(_layers(), seed=7)
    gpt_loss(reference(inputs), targets).backward()
    torch.optim.Adam(reference.parameters(), lr=0.01).step()
    pipe = pipeline(True)
    optimizer = torch.optim.Adam(pipe.parameters(), lr=0.01)
    pipe.step(inputs, targets)
    optimizer.step()
    save_checkpoint(pipe, f"{directory}/vocab", optimizer=optimizer, step=1)
    plain = pipeline(False)
    load_checkpoint(plain, f"{directory}/vocab")
    expected = dict(reference.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name].detach(), msg=lambda m, n=name: f"{n}: {m}")
    return sorted(name for name, _ in plain.named_parameters() if name.startswith("0."))


def stash_selective(*, schedule):
    """An asynchronous schedule (weight stashes) with and without selective recomputation:
    the same losses and weights after two steps, on each of 2 ranks."""
    results = {}
    for recompute in ("none", "selective"):
        pipe = Pipeline(
            _layers(tie=False), loss_fn=gpt_loss, schedule=schedule, num_microbatches=4,
            layout=LayoutOptions(recompute=recompute, seed=7),
            parallel=ParallelOptions(optimizer=lambda params: torch.optim.SGD(params, lr=0.1)),
            runtime=RuntimeOptions(timeout_s=60),
        )
        losses = [pipe.step(*_batch(8, seed=step)) for step in range(2)]
        results[recompute] = (losses, {name: p.detach().clone() for name, p in pipe.named_parameters()})
        modules = [m for module in pipe.local_modules.values() for m in module.modules()]
        flagged = sum(getattr(m, "recompute_core", False) for m in modules)
    (losses, weights), (selective_losses, selective_weights) = results["none"], results["selective"]
    torch.testing.assert_close(selective_losses, losses)
    for name, weight in weights.items():
        torch.testing.assert_close(selective_weights[name], weight, msg=lambda m, n=name: f"{n}: {m}")
    return flagged  # the selective pipeline's recomputed attention cores on this rank


def vocab_refused():
    """A vocabulary of 11 over 2 tp ranks: the ConfigError every rank raises while building."""
    try:
        Pipeline(
            _layers(11), loss_fn=gpt_loss, num_microbatches=2,
            parallel=ParallelOptions(
                process_group=_mesh(), tensor_parallel=gpt_tensor_parallel_plan(vocab_parallel=True)
            ),
            runtime=RuntimeOptions(timeout_s=30),
        )
    except ConfigError as error:
        return str(error)
    return None


MEGATRON_CASES = (
    ("1f1b", "none", None),
    ("1f1b", "full", None),
    ("zb-h1", "selective", None),  # split backward: I and W apart
    ("interleaved-1f1b", "none", 2),
    ("interleaved-1f1b", "full", 2),
)


def _megatron_layers() -> list:
    return gpt_layers(VOCAB, DIM, HEADS, 2, SEQ, dropout=0.3, attention="unfused")


def _megatron_reference(batches, num_microbatches, num_replicas=1):
    """One process: (losses, {name: grad}) after the batches' steps without zeroing, micro-batch
    j of step k of replica r (its equal share of the rows) drawing its masks in
    dropout_scope(seed=replica_seed(3, r), step=k, microbatch=j)."""
    from pipefold.model.dropout import dropout_scope, replica_seed

    reference = build_reference(_megatron_layers(), seed=7)
    reference.train()
    expected_losses = []
    for step, (inputs, targets) in enumerate(batches):
        total = 0.0
        shares = zip(inputs.chunk(num_replicas), targets.chunk(num_replicas), strict=True)
        for replica, (rows, row_targets) in enumerate(shares):
            pairs = zip(rows.chunk(num_microbatches), row_targets.chunk(num_microbatches), strict=True)
            for microbatch, (x, y) in enumerate(pairs):
                with dropout_scope(seed=replica_seed(3, replica), step=step, microbatch=microbatch):
                    loss = gpt_loss(reference(x), y) / (num_microbatches * num_replicas)
                loss.backward()
                total += loss.item()
        expected_losses.append(total)
    return expected_losses, {name: p.grad for name, p in reference.named_parameters()}


def _assert_megatron_matches(pipe, batches, expected_losses, expected_grads, case):
    from torch.distributed.tensor import DTensor

    shard = torch.arange(len(batches[0][0])).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
    losses = [pipe.step(inputs[shard], targets[shard]) for inputs, targets in batches]
    torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
    for name, param in pipe.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        torch.testing.assert_close(grad, expected_grads[name], msg=lambda m, n=name: f"{case} {n}: {m}")
    return sorted(name for name, _ in pipe.named_parameters())


def megatron_exact(*, cases, tp_cases=()):
    """Each (schedule, recompute, num_virtual): two steps without zeroing at pp2; loss and every
    gradient against one process drawing micro-batch j's masks of step k in dropout_scope.
    Each of `tp_cases` ((recompute, sequence_parallel)) runs the same at pp1 x tp2."""
    from torch.distributed.device_mesh import init_device_mesh

    from pipefold.model.dropout import dropout_steps

    num_microbatches, rows = 4, 8
    batches = [_batch(rows, seed=step) for step in range(2)]
    expected_losses, expected_grads = _megatron_reference(batches, num_microbatches)
    # Without dropout the losses differ: the masks above are really drawn.
    plain = build_reference(gpt_layers(VOCAB, DIM, HEADS, 2, SEQ, attention="unfused"), seed=7)
    assert abs(gpt_loss(plain(batches[0][0]), batches[0][1]).item() - expected_losses[0]) > 1e-3
    out = []
    for schedule, recompute, num_virtual in cases:
        dropout_steps.start_at(3, 0)  # the pool's ranks ran other pipelines before
        pipe = Pipeline(
            _megatron_layers(), loss_fn=gpt_loss, schedule=schedule, num_microbatches=num_microbatches,
            num_virtual=num_virtual, layout=LayoutOptions(recompute=recompute, seed=7),
            runtime=RuntimeOptions(timeout_s=60),
        )
        out.append(_assert_megatron_matches(pipe, batches, expected_losses, expected_grads,
                                            (schedule, recompute)))
    for recompute, sequence_parallel in tp_cases:
        dropout_steps.start_at(3, 0)
        pipe = Pipeline(
            _megatron_layers(), loss_fn=gpt_loss, schedule="gpipe", num_microbatches=num_microbatches,
            layout=LayoutOptions(recompute=recompute, seed=7),
            parallel=ParallelOptions(
                process_group=init_device_mesh("cpu", (1, 2), mesh_dim_names=("pp", "tp")),
                tensor_parallel=gpt_tensor_parallel_plan(sequence_parallel=sequence_parallel),
            ),
            runtime=RuntimeOptions(timeout_s=60),
        )
        out.append(_assert_megatron_matches(pipe, batches, expected_losses, expected_grads,
                                            ("tp2", recompute, sequence_parallel)))
    return out


MEGATRON_PP1_TP2_CASES = (("none", False), ("selective", True), ("full", True))
"""(recompute, sequence_parallel) of Megatron's GPT at pp1 x tp2 (on the two-rank pool)."""

MEGATRON_TP_CASES = (
    # (schedule, recompute, sequence_parallel, vocab_parallel, num_virtual) at pp2 x tp2
    ("1f1b", "none", False, False, None),
    ("zb-h1", "selective", True, True, None),  # split backward; the core's masks redrawn per head
    ("interleaved-1f1b", "full", True, False, 2),  # whole stages redraw the slices' masks
)


MEGATRON_DP2_TP2_CASES = (("selective", True, "replicate"), ("none", False, "full"))
"""(recompute, sequence_parallel, shard) of Megatron's GPT at dp2 x pp1 x tp2."""


def megatron_tp_exact(*, cases, dp_cases=()):
    """Megatron's GPT with seeded dropout at pp2 x tp2 (each tp rank holds 2 of the 4 heads):
    loss and every gradient (a shard's gathered whole) against one process. Each of `dp_cases`
    ((recompute, sequence_parallel, shard)) runs at dp2 x pp1 x tp2, each replica drawing from its own
    seed (`replica_seed`, as `pipefold train` sets it) on its half of the rows."""
    from torch.distributed.device_mesh import init_device_mesh

    from pipefold.model.dropout import dropout_steps, replica_seed

    num_microbatches, rows = 4, 8
    batches = [_batch(rows, seed=step) for step in range(2)]
    expected_losses, expected_grads = _megatron_reference(batches, num_microbatches)
    out = []
    for schedule, recompute, sequence_parallel, vocab_parallel, num_virtual in cases:
        dropout_steps.start_at(3, 0)
        plan = gpt_tensor_parallel_plan(sequence_parallel=sequence_parallel, vocab_parallel=vocab_parallel)
        pipe = Pipeline(
            _megatron_layers(), loss_fn=gpt_loss, schedule=schedule, num_microbatches=num_microbatches,
            num_virtual=num_virtual, layout=LayoutOptions(recompute=recompute, seed=7),
            parallel=ParallelOptions(process_group=_mesh(), tensor_parallel=plan),
            runtime=RuntimeOptions(timeout_s=60),
        )
        out.append(_assert_megatron_matches(pipe, batches, expected_losses, expected_grads,
                                            (schedule, recompute, sequence_parallel, vocab_parallel)))
    if dp_cases:
        expected_losses, expected_grads = _megatron_reference(batches, num_microbatches, num_replicas=2)
    for recompute, sequence_parallel, shard in dp_cases:
        mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("dp", "pp", "tp"))
        pipe = Pipeline(
            _megatron_layers(), loss_fn=gpt_loss, schedule="gpipe", num_microbatches=num_microbatches,
            layout=LayoutOptions(recompute=recompute, seed=7),
            parallel=ParallelOptions(
                process_group=mesh,
                tensor_parallel=gpt_tensor_parallel_plan(sequence_parallel=sequence_parallel),
                shard=shard,
            ),
            runtime=RuntimeOptions(timeout_s=60),
        )
        dropout_steps.start_at(replica_seed(3, pipe.data_parallel_rank), 0)
        out.append(_assert_megatron_matches(pipe, batches, expected_losses, expected_grads,
                                            ("dp2 x tp2", recompute, sequence_parallel, shard)))
    return out


# -- two ranks --------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_megatron_gpt_with_dropout_equals_one_process_under_every_schedule_and_recomputation():
    pool = WorkerPool(2, cases=__name__)
    try:
        results = pool.run("megatron_exact", cases=MEGATRON_CASES, tp_cases=MEGATRON_PP1_TP2_CASES)
    finally:
        pool.close()
    # Both ranks ran every case, and between them checked every parameter of the model.
    assert [len(r) for r in results] == [len(MEGATRON_CASES) + len(MEGATRON_PP1_TP2_CASES)] * 2
    names = {name for name, _ in build_reference(_megatron_layers(), seed=7).named_parameters()}
    assert all(set(first) | set(second) == names for first, second in zip(*results, strict=True))


# -- four ranks -------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "tie", "recompute", "sequence_parallel", "num_virtual"),
    [
        ("1f1b", True, "none", False, None),
        # zb-v puts stages 0 and 3 on one rank (the tied table twice on it), splits I and W.
        ("zb-v", True, "selective", False, None),
        ("interleaved-1f1b", False, "full", True, 2),
    ],
)
def test_vocabulary_parallel_gpt_equals_one_process(pool4, schedule, tie, recompute, sequence_parallel,
                                                     num_virtual):
    results = pool4.run(
        "vocab_exact", schedule=schedule, tie=tie, recompute=recompute,
        sequence_parallel=sequence_parallel, num_virtual=num_virtual,
    )
    assert all(r["losses"] == results[0]["losses"] for r in results), "ranks disagree on the loss"
    # Every rank holding a table or head holds half of its rows.
    rows = {name: n for r in results for name, n in r["table_rows"].items()}
    assert rows and set(rows.values()) == {VOCAB // 2}, rows
    assert ("5.weight" in rows) == (not tie)  # the untied head is its own layer 5
    # Selective: every rank's blocks (2 in all, on 2 of the 4 stages under zb-v) recompute their core.
    assert sum(r["recomputed_cores"] for r in results) == (4 if recompute == "selective" else 0)


@pytest.mark.multiprocess
def test_megatron_gpt_with_dropout_under_tensor_parallelism_equals_one_process(pool4):
    results = pool4.run("megatron_tp_exact", cases=MEGATRON_TP_CASES, dp_cases=MEGATRON_DP2_TP2_CASES)
    num_cases = len(MEGATRON_TP_CASES) + len(MEGATRON_DP2_TP2_CASES)
    assert [len(r) for r in results] == [num_cases] * 4
    names = {name for name, _ in build_reference(_megatron_layers(), seed=7).named_parameters()}
    for case in range(num_cases):  # the pp ranks between them checked every parameter
        assert set().union(*(r[case] for r in results)) == names


@pytest.mark.multiprocess
def test_a_vocabulary_the_tp_ranks_cannot_split_is_refused(pool4):
    messages = pool4.run("vocab_refused")
    assert all(m is not None and "vocab_size=11" in m and "pad the vocabulary to a multiple of 2" in m
               for m in messages), messages


@pytest.mark.multiprocess
def test_a_vocabulary_split_checkpoint_loads_without_tensor_parallelism(pool4, tmp_path):
    results = pool4.run("vocab_checkpoint", directory=str(tmp_path))
    assert ["0.weight"] in results  # the tied table, held whole where it was split by vocabulary


@pytest.mark.multiprocess
def test_selective_recomputation_on_a_weight_stash_equals_none():
    pool = WorkerPool(2, cases=__name__)
    try:
        assert sum(pool.run("stash_selective", schedule="pipedream")) == 2  # the GPT's 2 blocks
    finally:
        pool.close()


# -- one process ------------------------------------------------------------------------------------


def test_the_vocabulary_parallel_cross_entropy_is_the_plain_one_on_a_world_of_one(tmp_path):
    """Its arithmetic (max shift, target pick, softmax - one-hot backward) on one rank."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from pipefold.model.zoo import vocab_parallel_cross_entropy

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        logits = (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_()
        targets = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
        split = DTensor.from_local(logits, mesh, [Shard(2)], run_check=False)
        loss = vocab_parallel_cross_entropy(split, targets)
        (grad,) = torch.autograd.grad(loss, logits)
        expected = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))
        (expected_grad,) = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(grad, expected_grad)
        assert torch.equal(gpt_loss(split, targets), loss)
        with pytest.raises(ConfigError, match="Shard"):
            from torch.distributed.tensor import Replicate

            vocab_parallel_cross_entropy(DTensor.from_local(logits, mesh, [Replicate()]), targets)
    finally:
        dist.destroy_process_group()


def _block_run(mode: str, rows: int = 2, seq: int = 32, dim: int = 32, heads: int = 4):
    """One decoder block's forward and backward: (output, grads, bytes it kept for backward)."""
    from pipefold.model.zoo.gpt import DecoderBlock
    from pipefold.runtime.memory import ActivationCounter

    torch.manual_seed(0)
    block = DecoderBlock(dim, heads, 2)
    block.attn.recompute_core = mode == "selective"
    x = torch.randn(rows, seq, dim, generator=torch.Generator().manual_seed(1))
    leaf = x.clone().requires_grad_()
    counter = ActivationCounter(block.parameters())
    with counter.counting():
        if mode == "full":
            y = torch.utils.checkpoint.checkpoint(block, leaf, use_reentrant=False)
        else:
            y = block(leaf)
    kept = counter.peak
    grads = torch.autograd.grad(y.square().sum(), [leaf, *block.parameters()])
    return y.detach(), grads, kept


def test_selective_recomputation_is_exact_and_keeps_between_none_and_full():
    y_none, grads_none, kept_none = _block_run("none")
    y_sel, grads_sel, kept_sel = _block_run("selective")
    _, _, kept_full = _block_run("full")
    torch.testing.assert_close(y_sel, y_none)
    for selective, plain in zip(grads_sel, grads_none, strict=True):
        torch.testing.assert_close(selective, plain)
    assert kept_full < kept_sel < kept_none, (kept_full, kept_sel, kept_none)


def test_the_planner_prices_what_a_block_keeps_within_10_percent():
    """GptEstimate's activations of one built-in GPT block (fused attention, fp32) against the
    bytes the runtime keeps, without and with selective recomputation."""
    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.hardware import load_hardware

    rows, seq, dim, heads = 2, 32, 32, 4
    estimate = GptEstimate(num_layers=2, d_model=dim, num_heads=heads, seq_len=seq, vocab_size=256,
                           hardware=load_hardware("cpu"), dtype="fp32")
    for mode, priced in (("none", estimate), ("selective", estimate.attention_recomputed())):
        kept = _block_run(mode, rows, seq, dim, heads)[2]
        predicted = priced.block_activation_bytes(rows, 1, False)
        assert abs(predicted - kept) <= 0.10 * kept, (mode, predicted, kept)


def test_selective_is_refused_for_a_model_without_attention_cores():
    from torch import nn

    from pipefold.runtime.selective import check_selective, recompute_attention_cores

    with pytest.raises(ConfigError, match="recompute='selective' is not allowed: no layer"):
        check_selective([nn.Linear(2, 2), nn.LayerNorm(2)])
    from pipefold.model.zoo.gpt import DecoderBlock

    blocks = [DecoderBlock(8, 2, 2), nn.LayerNorm(8)]
    check_selective(blocks)
    assert recompute_attention_cores(blocks) == 1 and blocks[0].attn.recompute_core


def test_the_rulebook_takes_selective_and_refuses_an_unsplittable_vocabulary():
    from pipefold.parallel_config import ParallelConfig

    ParallelConfig(pp=2, recompute="selective").check()
    ParallelConfig(pp=2, schedule="pipedream", weight_update="stash", recompute="selective").check()
    with pytest.raises(ConfigError, match='"selective"'):
        ParallelConfig(recompute="partial").check()
    with pytest.raises(ConfigError, match=r"vocab_size=250 is not allowed: .* multiple of 4 \(e.g. 252\)"):
        ParallelConfig(tp=4, vocab_parallel=True, vocab_size=250).check()
    with pytest.raises(ConfigError, match="vocab_parallel=True is not allowed: .* tp > 1"):
        ParallelConfig(vocab_parallel=True).check()
