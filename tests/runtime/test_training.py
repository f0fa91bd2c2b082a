"""Training as real runs do it, across ranks: global gradient clipping (and what later features
add) against the unsplit model in one process.

Four ranks start once for the module. Each case builds its layout on them (two pipelines of 2,
one of 4, dp2 x pp2, pp2 x tp2), runs steps, and checks on every rank that the returned norm
and every clipped gradient equal `torch.nn.utils.clip_grad_norm_` on the reference model.
The rank-side functions live in this module (`WorkerPool(..., cases=__name__)`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _cases import _batch, _loss_fn, transformer
from _workers import WorkerPool
from test_tensor_parallel import _plan, gpt, tied_lm

from pipefold.model import build_reference
from pipefold.runtime import (
    LayoutOptions,
    ParallelOptions,
    Pipeline,
    RuntimeOptions,
    gpt_tensor_parallel_plan,
)
from pipefold.runtime.parallel.tensor_parallel import whole


@pytest.fixture(scope="module")
def pool4():
    pool = WorkerPool(4, cases=__name__)
    yield pool
    pool.close()


# -- rank side -------------------------------------------------------------------------------------


def _layout(layout: str, schedule: str, num_microbatches: int):
    """(pipeline, layers builder, batch kind, sequence length) for a named layout on 4 ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    options: dict = {}
    build, kind, length = transformer, "transformer", None
    if layout == "pp2":  # two independent pipelines of two ranks each
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        options["process_group"] = groups[dist.get_rank() // 2]
    elif layout == "dp2xpp2":
        options["process_group"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    elif layout == "pp2xtp2":
        options["process_group"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
        options["tensor_parallel"] = _plan()
        build = tied_lm
    elif layout == "pp2xtp2-sp":  # the built-in GPT, sequence parallel: replicated norms' gradients
        options["process_group"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
        options["tensor_parallel"] = gpt_tensor_parallel_plan(sequence_parallel=True)
        build, length = gpt, 4
    elif layout != "pp4":
        raise ValueError(layout)
    pipe = Pipeline(
        build(), loss_fn=_loss_fn(kind), schedule=schedule, num_microbatches=num_microbatches,
        layout=LayoutOptions(seed=7), runtime=RuntimeOptions(timeout_s=60),
        parallel=ParallelOptions(**options),
    )
    return pipe, build, kind, length


def clip(
    *, layout: str, norm_type: float, max_norm: float, schedule: str = "1f1b", num_steps: int = 2
) -> dict:
    """Steps with clipping and SGD on `layout` and on one process: the same norm each step, the
    same clipped gradients and the same weights."""
    torch.manual_seed(1234)
    pipe, build, kind, length = _layout(layout, schedule, 4)
    reference = build_reference(build(), seed=7)
    loss_fn = _loss_fn(kind)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    expected_params = dict(reference.named_parameters())
    rows = 8
    norms = []
    for step in range(num_steps):
        inputs, targets = _batch(kind, rows, seed=step)
        if length is not None:
            inputs, targets = inputs[:, :length], targets[:, :length]
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        pipe.step(inputs[shard], targets[shard])
        norm = pipe.clip_grad_norm_(max_norm, norm_type)
        loss_fn(reference(inputs), targets).backward()
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)
        torch.testing.assert_close(norm, expected.item(), rtol=1e-5, atol=1e-7)
        norms.append(norm)
        for name, param in pipe.named_parameters():
            torch.testing.assert_close(
                whole(param.grad), expected_params[name].grad, msg=lambda m, n=name: f"{n}: {m}"
            )
        optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(whole(param.detach()), expected_params[name].detach())
    return {"norms": norms}


def accumulate(*, layout: str, num_batches: int, max_norm: float) -> dict:
    """`num_batches` pipeline steps averaged (the job's gradient accumulation), then clipped:
    the gradient and norm of one step of all their rows in one process."""
    from pipefold.job.optim import accumulated_step

    torch.manual_seed(1234)
    pipe, build, kind, _ = _layout(layout, "1f1b", 4)
    reference = build_reference(build(), seed=7)
    rows = 8
    batches = [_batch(kind, rows, seed=index) for index in range(num_batches)]
    shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
    loss = accumulated_step(pipe, [(inputs[shard], targets[shard]) for inputs, targets in batches])
    norm = pipe.clip_grad_norm_(max_norm)
    inputs = torch.cat([inputs for inputs, _ in batches])
    targets = torch.cat([targets for _, targets in batches])
    expected_loss = _loss_fn(kind)(reference(inputs), targets)
    expected_loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    torch.testing.assert_close(loss, expected_loss.item(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm, expected.item(), rtol=1e-5, atol=1e-7)
    params = dict(reference.named_parameters())
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(whole(param.grad), params[name].grad, msg=lambda m, n=name: f"{n}: {m}")
    return {"norm": norm}


def evaluate(*, layout: str, schedule: str = "1f1b", rows: int = 10) -> dict:
    """`Pipeline.evaluate` (forward only) equals the unsplit model's loss on the same batch, leaves
    no gradient, and a training step after it is still exact."""
    torch.manual_seed(1234)
    pipe, build, kind, length = _layout(layout, schedule, 4)
    reference = build_reference(build(), seed=7)
    loss_fn = _loss_fn(kind)
    losses = []
    for seed in (5, 6):
        inputs, targets = _batch(kind, rows, seed=seed)
        if length is not None:
            inputs, targets = inputs[:, :length], targets[:, :length]
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        loss = pipe.evaluate(inputs[shard], targets[shard])
        with torch.no_grad():
            expected = loss_fn(reference(inputs), targets)
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        losses.append(loss)
    assert all(param.grad is None for param in pipe.parameters())
    inputs, targets = _batch(kind, 8, seed=0)
    if length is not None:
        inputs, targets = inputs[:, :length], targets[:, :length]
    shard = torch.arange(8).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
    loss = pipe.step(inputs[shard], targets[shard])
    torch.testing.assert_close(loss, loss_fn(reference(inputs), targets).item(), rtol=1e-5, atol=1e-6)
    return {"losses": losses}


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "norm_type", "max_norm"),
    [
        ("pp2", 2.0, 0.05),          # clipped (the gradient norm is about 1)
        ("pp4", 2.0, 0.05),          # tied embedding / head on ranks 0 and 3
        ("pp4", math.inf, 0.01),
        ("dp2xpp2", 2.0, 0.05),
        ("dp2xpp2", 1.0, 1e6),       # not clipped: the factor is 1
        ("pp2xtp2", 2.0, 0.05),      # tied layers whole, blocks split
        ("pp2xtp2", math.inf, 0.01),
        ("pp2xtp2-sp", 2.0, 0.05),   # sequence parallel: replicated norm weights over tp
    ],
)
def test_clip_grad_norm_equals_one_process(pool4, layout, norm_type, max_norm):
    results = pool4.run("clip", layout=layout, norm_type=norm_type, max_norm=max_norm)
    # One float, bit-identical on every rank of every replica and tp peer.
    assert all(result["norms"] == results[0]["norms"] for result in results)


def test_accumulated_steps_equal_one_large_batch(pool4):
    results = pool4.run("accumulate", layout="dp2xpp2", num_batches=3, max_norm=0.05)
    assert len({result["norm"] for result in results}) == 1


@pytest.mark.parametrize(
    ("layout", "schedule"),
    [("pp4", "1f1b"), ("pp2", "zb-v"), ("dp2xpp2", "interleaved-1f1b"), ("pp2xtp2-sp", "1f1b")],
)
def test_evaluate_equals_one_process(pool4, layout, schedule):
    results = pool4.run("evaluate", layout=layout, schedule=schedule)
    assert all(result["losses"] == results[0]["losses"] for result in results)
