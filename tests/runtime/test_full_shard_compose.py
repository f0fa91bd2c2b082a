"""Full sharding composed with fp16's dynamic loss scale and with tied layers, at dp2 x pp2
against one process.

Four ranks (the shared pool) run this module's rank-side functions (`WorkerPool(4,
cases=__name__)`): `fp16_sharded` checks the loss, every gradient (as full tensors) and the
weights after AdamW under the same autocast and scale, and that an inf injected into one stage
of one replica drops the step and halves the scale on every rank; `tied_sharded` checks the
built-in GPT exactly, with its tied embedding and head on pipeline ranks 0 and 1 of each replica
(1f1b, interleaved-1f1b) or both on rank 0 (zb-v, dualpipe-v: one FSDP unit of stages 0 and 3).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from _cases import DIM, VOCAB, _batch, _loss_fn, mlp
from _workers import WorkerPool
from test_tensor_parallel import gpt
from test_training import BF16_RTOL, _autocast_forward
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import build_reference
from pipefold.runtime import LayoutOptions, ParallelOptions, Pipeline, RuntimeOptions
from pipefold.runtime.parallel.full_shard import _joined
from pipefold.schedule import gathers_per_step, reductions_per_step, shard_units


@pytest.fixture(scope="module")
def pool4():
    pool = WorkerPool(4, cases=__name__)
    yield pool
    pool.close()


# -- rank side -------------------------------------------------------------------------------------


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))


def _inject_inf(pipe: Pipeline) -> list:
    """An inf in the gradient of this rank's first Linear weight during the next step: the hook
    goes on the whole (gathered) weight each forward sees, the leaf the backward reaches."""
    linear = next(m for m in pipe.stages[0].module.modules() if isinstance(m, nn.Linear))
    handles: list = []

    def pre_hook(module, args):
        handles.append(module.weight.register_hook(lambda grad: torch.full_like(grad, math.inf)))

    handles.append(linear.register_forward_pre_hook(pre_hook))
    return handles


def fp16_sharded(*, inject_rank: int, scale: float = 2.0**12) -> dict:
    """dp2 x pp2, fully sharded, fp16 with a dynamic loss scale. Steps 0 and 2 give the unsplit
    model's loss and unscaled gradients under the same autocast and scale; at step 1 an inf on
    world rank `inject_rank` (one stage of one replica) makes every rank keep step 0's gradient
    shards and halve the scale; then AdamW steps give the model's weights."""
    torch.manual_seed(1234)
    kind = "mlp"
    pipe = Pipeline(
        mlp(), loss_fn=_loss_fn(kind), schedule="zb-h1", num_microbatches=4, layout=LayoutOptions(seed=7),
        parallel=ParallelOptions(process_group=_mesh(), shard="full"),
        runtime=RuntimeOptions(
            timeout_s=60, precision="fp16", loss_scale=scale, loss_scale_growth_interval=100
        ),
    )
    reference = build_reference(mlp(), seed=7)
    params = dict(reference.named_parameters())
    loss_fn = _loss_fn(kind)
    rows = 8
    scales, skipped = [], []
    assert pipe.loss_scale is not None

    def step(seed: int, *, inject: bool = False) -> float:
        inputs, targets = _batch(kind, rows, seed=seed)
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        used = pipe.loss_scale.scale
        handles = _inject_inf(pipe) if inject and dist.get_rank() == inject_rank else []
        loss = pipe.step(inputs[shard], targets[shard])
        for handle in handles:
            handle.remove()
        scales.append(pipe.loss_scale.scale)
        skipped.append(pipe.loss_scale.skipped)
        if not inject:
            expected = loss_fn(_autocast_forward(reference, inputs, pipe, torch.float16), targets)
            torch.testing.assert_close(loss, expected.item(), rtol=BF16_RTOL, atol=0)
            grads = torch.autograd.grad(expected * used, list(params.values()))
            for param, grad in zip(params.values(), grads, strict=True):
                param.grad = grad / used if param.grad is None else param.grad + grad / used
            for name, param in pipe.named_parameters():  # unscaled shards, as full tensors
                want = params[name].grad
                torch.testing.assert_close(
                    param.grad.full_tensor(), want, rtol=BF16_RTOL, atol=BF16_RTOL * want.abs().max().item(),
                    msg=lambda m, n=name: f"{n}: {m}",
                )
        return loss

    step(0)
    before = {name: p.grad.full_tensor() for name, p in pipe.named_parameters()}
    step(1, inject=True)
    for name, param in pipe.named_parameters():
        assert torch.equal(param.grad.full_tensor(), before[name]), name  # step 1 dropped everywhere
    step(2)  # accumulated onto step 0's gradients
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.01)
    expected_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01)
    for seed in (3, 4):
        optimizer.step()
        expected_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected_optimizer.zero_grad(set_to_none=True)
        step(seed)
    optimizer.step()
    expected_optimizer.step()
    # fp16 rounding moves AdamW's normalized updates a little: within 1% of the 3 steps of lr.
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.full_tensor(), params[name].detach(), rtol=0, atol=3e-4,
                                   msg=lambda m, n=name: f"{n}: {m}")
    return {"scales": scales, "skipped": skipped}


def _shared_list() -> list[nn.Module]:
    """A plain layer list whose head shares the embedding's weight (`head.weight = embed.weight`)."""
    torch.manual_seed(0)
    embed, head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB, bias=False)
    head.weight = embed.weight
    return [embed, nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM), head]


def tied_sharded(
    *, schedule: str, free_between: bool = False, lookahead: int = 0, model: str = "gpt"
) -> dict:
    """The built-in GPT at dp2 x pp2, fully sharded: its tied embedding and head (the vocabulary
    of 11 rows split 6 / 5 over "dp") sum their gradient shards between pipeline ranks 0 and 1,
    or, on two stages of rank 0 (a V placement), sum their whole gradients in one FSDP unit
    before its reduce-scatter; two accumulated steps give the model's loss and every gradient,
    AdamW its weights. `model="shared"`: a plain list whose head shares the embedding's weight."""
    torch.manual_seed(1234)
    kind = "transformer"
    loss_fn = _loss_fn(kind)
    layers = gpt() if model == "gpt" else _shared_list()
    pipe = Pipeline(
        layers, loss_fn=loss_fn, schedule=schedule, num_microbatches=2, layout=LayoutOptions(seed=7),
        parallel=ParallelOptions(
            process_group=_mesh(), shard="full", free_between_microbatches=free_between,
            gather_lookahead=lookahead,
        ),
        runtime=RuntimeOptions(timeout_s=60),
    )
    reference = build_reference(gpt(), seed=7) if model == "gpt" else nn.Sequential(*_shared_list())
    params = dict(reference.named_parameters())
    rows = 6

    def step(seed: int) -> None:
        inputs, targets = _batch(kind, rows, seed=seed)
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        loss = pipe.step(inputs[shard], targets[shard])
        expected = loss_fn(reference(inputs), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)

    for seed in range(2):
        step(seed)
    names = []
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad.full_tensor(), params[name].grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
        names.append(name)
    # The gradient norm over shards, stages and replicas counts the tied weight once.
    norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
    assert abs(pipe.gradient_scope().total_norm() - norm) < 1e-5 * norm
    # The attention's key bias has a gradient of float noise only (softmax ignores it), which
    # AdamW's default eps would blow up to lr-sized steps of either sign.
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.01, eps=1e-4)
    expected_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01, eps=1e-4)
    for seed in range(2, 4):
        optimizer.step()
        expected_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected_optimizer.zero_grad(set_to_none=True)
        step(seed)
    optimizer.step()
    expected_optimizer.step()
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.full_tensor(), params[name].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert pipe.sharding is not None
    # What the simulator and the planner count for the schedule this rank ran, from the
    # torch-free units of the model's tied first and last stage (docs/parallelism.md).
    running = pipe.running_schedule
    described = shard_units(running.placement, [(0, running.num_stages - 1)])
    return {
        "rank": pipe.rank, "names": names, "tied": [owners for owners, _ in pipe.tied.groups],
        "units": pipe.sharding.units, "gathers": pipe.sharding.num_gathers,
        "reductions": pipe.sharding.num_reductions,
        "described": described, "gathers_per_step": gathers_per_step(running, described),
        "reductions_per_step": reductions_per_step(running, described),
    }


def tied_misordered() -> str | None:
    """Hand-built groups where pipeline [0, 3]'s ranks are replicas 0 and 1 along their
    data-parallel groups ({0, 1} and {2, 3}): the tied owners would sum unlike shards; refused
    on every rank (both pipelines are mixed)."""
    pipelines = [dist.new_group([0, 3]), dist.new_group([1, 2])]
    replicas = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rank = dist.get_rank()
    try:
        Pipeline(
            gpt(), loss_fn=_loss_fn("transformer"), schedule="1f1b", num_microbatches=2,
            parallel=ParallelOptions(
                process_group=pipelines[rank in (1, 2)], data_parallel_group=replicas[rank >= 2], shard="full"
            ),
            runtime=RuntimeOptions(timeout_s=60),
        )
    except ConfigError as error:
        return str(error)
    return None


# -- tests -----------------------------------------------------------------------------------------


def test_stages_holding_one_weight_are_one_unit():
    """Stages of one rank that hold one parameter (by identity) are grouped; stages without
    parameters are left out."""
    tied, other, alone = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
    stages = [
        SimpleNamespace(index=3, parameters=(tied,)),
        SimpleNamespace(index=0, parameters=(tied, other)),
        SimpleNamespace(index=1, parameters=()),
        SimpleNamespace(index=2, parameters=(alone,)),
        SimpleNamespace(index=5, parameters=(other,)),
    ]
    assert [[stage.index for stage in group] for group in _joined(stages)] == [[0, 3, 5], [2]]


@pytest.mark.multiprocess
def test_fp16_overflow_on_one_stage_of_one_replica_skips_the_sharded_step_everywhere(pool4):
    scale = 2.0**12
    # World rank 3: pipeline rank 1 (the last stage) of data-parallel replica 1.
    results = pool4.run("fp16_sharded", inject_rank=3, scale=scale)
    for result in results:
        assert result["skipped"] == [False, True, False, False, False], result
        assert result["scales"] == [scale, scale / 2, scale / 2, scale / 2, scale / 2], result


@pytest.mark.multiprocess
def test_tied_embedding_and_head_fully_sharded_equal_one_process(pool4):
    for schedule in ("1f1b", "interleaved-1f1b"):  # interleaved: the head on rank 1's second stage
        results = pool4.run("tied_sharded", schedule=schedule)
        for result in results:
            assert result["tied"] == [(0, 1)], result  # pipeline ranks 0 and 1 of the replica
    # A V placement puts the embedding (stage 0) and the head (stage 3) on rank 0: one unit,
    # gathered and reduce-scattered once per step (4 steps), nothing exchanged between ranks.
    for schedule, options in (
        ("zb-v", {}), ("dualpipe-v", {}), ("zb-v", {"free_between": True, "lookahead": 1}),
        ("zb-v", {"model": "shared"}),  # a parameter two layers share (`head.weight = embed.weight`)
    ):
        results = pool4.run("tied_sharded", schedule=schedule, **options)
        for result in results:
            assert result["tied"] == [], result
            rank1 = ((2,),) if options.get("model") == "shared" else ((1,), (2,))  # stage 1: Tanh
            units = ((0, 3),) if result["rank"] == 0 else rank1
            assert result["units"] == units, result
            assert result["reductions"] == 4 * len(units), result
            if not options.get("free_between") or result["rank"] == 0:  # rank 0: the unit is all it holds
                assert result["gathers"] == 4 * len(units), result
            # The torch-free units hold the runtime's (and parameter-free stages alone), and the
            # schedule's counts per unit are what the runtime ran in each of its 4 steps.
            assert set(units) <= set(result["described"]), result
            for count, per_step in (("gathers", "gathers_per_step"), ("reductions", "reductions_per_step")):
                assert result[count] == 4 * sum(result[per_step][unit[0]] for unit in units), result
    messages = pool4.run("tied_misordered")
    assert all(message is not None and "the same replica" in message for message in messages), messages
