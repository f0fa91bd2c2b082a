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
from torch.distributed.tensor import DTensor

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


def _layout(layout: str, schedule: str, num_microbatches: int, precision: str = "fp32"):
    """(pipeline, layers builder, batch kind, sequence length) for a named layout on 4 ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    options: dict = {}
    build, kind, length = transformer, "transformer", None
    if layout == "pp2":  # two independent pipelines of two ranks each
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        options["process_group"] = groups[dist.get_rank() // 2]
    elif layout in ("dp2xpp2", "dp2xpp2-full"):
        options["process_group"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
        if layout == "dp2xpp2-full":  # each stage's weights sharded over the replicas (FSDP2)
            options["shard"] = "full"
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
        layout=LayoutOptions(seed=7), runtime=RuntimeOptions(timeout_s=60, precision=precision),
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


BF16_RTOL = 2e-2
"""bf16 keeps 8 significant bits (relative rounding 2**-9, about 0.2%). The reference below makes
the same casts as the pipeline, so what differs is the micro-batch split: a GEMM over fewer rows
may accumulate in another order, which can move an output by one bf16 step (0.4%) where it lies
near a rounding boundary, and such steps add up over a few layers. 2% (five steps) bounds that
with room; the test also checks the pipeline is much nearer this reference than fp32."""


def _autocast_forward(reference, inputs, pipe, dtype=torch.bfloat16):
    """The reference model under autocast in `dtype`, making the pipeline's casts: one autocast
    region per stage, fp32 outputs of a stage cast to `dtype` (the boundary), the last stage's
    `dtype` output cast to fp32 for the loss."""
    from pipefold.runtime.stage import cast_floating

    value = inputs
    last = pipe.schedule.num_stages - 1
    for stage in range(pipe.schedule.num_stages):
        with torch.autocast("cpu", dtype=dtype):
            for index in pipe.partition.layers_of(stage):
                module, forward_fn = reference[index], reference._forward_fns[index]
                value = module(value) if forward_fn is None else forward_fn(module, value)
        if stage == last:
            value = cast_floating(value, dtype, torch.float32)
        else:
            value = cast_floating(value, torch.float32, dtype)
    return value


def precision(*, layout: str, schedule: str, num_steps: int = 2) -> dict:
    """A bf16 pipeline against the unsplit model under the same autocast: loss and every gradient
    within BF16_RTOL, fp32 weights and gradients, much nearer than the fp32 model, and half the
    boundary bytes of the same pipeline in fp32."""
    torch.manual_seed(1234)
    pipe, build, kind, length = _layout(layout, schedule, 4, precision="bf16")
    plain, _, _, _ = _layout(layout, schedule, 4)
    reference = build_reference(build(), seed=7)
    fp32_reference = build_reference(build(), seed=7)
    loss_fn = _loss_fn(kind)
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    params = dict(reference.named_parameters())
    fp32_params = dict(fp32_reference.named_parameters())
    rows = 8
    near = far = 0.0
    for step in range(num_steps):
        inputs, targets = _batch(kind, rows, seed=step)
        if length is not None:
            inputs, targets = inputs[:, :length], targets[:, :length]
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        loss = pipe.step(inputs[shard], targets[shard])
        expected = loss_fn(_autocast_forward(reference, inputs, pipe), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=BF16_RTOL, atol=0)
        if step == 0:  # the fp32 pipeline and model at the same (initial) weights
            plain.step(inputs[shard], targets[shard])
            loss_fn(fp32_reference(inputs), targets).backward()
        for name, param in pipe.named_parameters():
            grad = whole(param.grad)
            assert param.dtype == torch.float32 and grad.dtype == torch.float32, name
            want = params[name].grad
            scale = want.abs().max().item()
            torch.testing.assert_close(
                grad, want, rtol=BF16_RTOL, atol=BF16_RTOL * scale, msg=lambda m, n=name: f"{n}: {m}"
            )
            if step == 0:
                near += (grad - want).pow(2).sum().item()
                far += (grad - fp32_params[name].grad).pow(2).sum().item()
        optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    from pipefold.model import TensorMeta

    def floating_bytes(pipeline) -> int:  # the boundaries between layers, one micro-batch of 2 rows
        boundaries = pipeline._boundaries(TensorMeta.of(inputs), 2)[:-1]
        return sum(
            size for meta in boundaries
            for size, dtype in zip(meta.byte_sizes, meta.dtypes, strict=True) if dtype.is_floating_point
        )

    return {
        "near": near, "far": far,
        "bf16_bytes": pipe.last_sent_bytes, "fp32_bytes": plain.last_sent_bytes,
        "bf16_floating": floating_bytes(pipe), "fp32_floating": floating_bytes(plain),
    }


PURE_RTOL = 0.08
"""bf16 weights and gradients against the unsplit bf16 model, per tensor: the L2 distance within
8% of the tensor's norm (measured at most 5.4%, on a norm's 8-entry bias after 3 steps). Every
gradient is a bf16 sum, over micro-batches here and over rows in one GEMM there, so two
equally correct runs differ by a few bf16 steps (2**-8) of the largest addends; where those
cancel (a bias summed over all tokens) that is several percent of the result, and SGD carries
it into the next steps' weights. A replica's gradient missing from the sum would be ~50% off."""


def _relative_distance(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def pure(*, layout: str, schedule: str = "1f1b", num_steps: int = 3) -> dict:
    """bf16 weights (`precision="bf16-pure"`) on `layout` against the unsplit model in bf16 under
    the same autocast and casts, both stepped by fp32 master weights (SGD). Each step: the loss
    within BF16_RTOL; every gradient bf16 (after the data-parallel all-reduce, which runs in
    fp32) and within PURE_RTOL, at the first step (the same weights) also entry by entry within
    BF16_RTOL. After the steps every bf16 weight and fp32 master within PURE_RTOL.
    "<layout>-zero1": the optimizer ZeRO-sharded over the replicas, each keeping the masters of
    its own parameters only; the memory report's optimizer bytes per rank are returned.
    "dp2xpp2-full": each stage's weights bf16 shards over the replicas (FSDP2), reduce-scattered
    in fp32, each rank keeping the masters of its own shards (DTensors of their layout)."""
    from pipefold.runtime import fp32_master_weights, sharded_optimizer
    from pipefold.runtime.parallel.data_parallel import reduce_dtype

    layout, zero = layout.removesuffix("-zero1"), layout.endswith("-zero1")
    torch.manual_seed(1234)
    pipe, build, kind, length = _layout(layout, schedule, 4, precision="bf16-pure")
    reference = build_reference(build(), seed=7).to(torch.bfloat16)
    loss_fn = _loss_fn(kind)
    master_sgd = fp32_master_weights(torch.optim.SGD)

    def make_optimizer(pipeline):
        if zero:
            return sharded_optimizer(pipeline, master_sgd, lr=0.5)
        return master_sgd(pipeline.parameters(), lr=0.5)

    def masters(run_optimizer):  # the fp32 masters this rank keeps (its own under ZeRO)
        state = run_optimizer.optim.state if zero else run_optimizer.state
        return {param: entry["master"] for param, entry in state.items() if "master" in entry}

    optimizer = make_optimizer(pipe)
    reference_optimizer = master_sgd(reference.parameters(), lr=0.5)
    params = dict(reference.named_parameters())
    assert reduce_dtype(torch.bfloat16) == torch.float32
    rows = 8
    losses, distances = [], []
    for step in range(num_steps):
        inputs, targets = _batch(kind, rows, seed=step)
        if length is not None:
            inputs, targets = inputs[:, :length], targets[:, :length]
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        reduced: list[torch.dtype] = []
        reduce_scatter = dist.reduce_scatter_single
        if pipe.sharding is not None:  # full sharding: record what its reduce-scatters carry
            def recording_rs(*args, reduced=reduced, reduce_scatter=reduce_scatter, **kwargs):
                reduced.append(kwargs["input"].dtype)
                return reduce_scatter(*args, **kwargs)

            dist.reduce_scatter_single = recording_rs
        try:
            loss = pipe.step(inputs[shard], targets[shard])
        finally:
            dist.reduce_scatter_single = reduce_scatter
        # The bf16 gradients are summed over the replicas in fp32 (rounded once, into bf16).
        assert set(reduced) == ({torch.float32} if pipe.sharding is not None else set()), reduced
        expected = loss_fn(_autocast_forward(reference, inputs, pipe), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=BF16_RTOL, atol=0)
        losses.append(loss)
        for name, param in pipe.named_parameters():
            grad, want = whole(param.grad), params[name].grad
            assert param.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16, name
            distances.append(_relative_distance(grad, want))
            assert distances[-1] < PURE_RTOL, (step, name, distances[-1])
            if step == 0:
                torch.testing.assert_close(
                    grad.float(), want.float(), rtol=BF16_RTOL, atol=BF16_RTOL * want.abs().max().item(),
                    msg=lambda m, n=name: f"{n}: {m}",
                )
        sent: list[torch.dtype] = []
        broadcast = dist.broadcast
        if zero:  # ZeRO's owners send their updated weights: record what they send
            def recording(tensor, *args, sent=sent, broadcast=broadcast, **kwargs):
                sent.append(tensor.dtype)
                return broadcast(tensor, *args, **kwargs)

            dist.broadcast = recording
        try:
            optimizer.step()
        finally:
            dist.broadcast = broadcast
        assert set(sent) == ({torch.bfloat16} if zero else set()), sent
        optimizer.zero_grad()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    full = pipe.sharding is not None
    if full:  # each replica holds bf16 shards, and the fp32 masters of its own shards only
        for param in pipe.parameters():
            assert isinstance(param, DTensor) and param.dtype == torch.bfloat16
            master = optimizer.state[param]["master"]
            assert isinstance(master, DTensor) and master.dtype == torch.float32
            assert master.placements == param.placements and master.to_local().shape == param.to_local().shape
    elif pipe.num_data_parallel > 1:  # the replicas hold the same bf16 weights (ZeRO: as sent)
        for name, param in pipe.named_parameters():
            copies = [torch.empty_like(param) for _ in range(pipe.num_data_parallel)]
            dist.all_gather(copies, param.detach(), group=pipe.data_parallel_group)
            assert all(torch.equal(copy, copies[0]) for copy in copies), name
    kept = masters(optimizer)
    if zero:  # this replica's masters are those of the parameters it owns, and only those
        owned = {id(p) for group in optimizer.optim.param_groups for p in group["params"]}
        assert {id(p) for p in kept} == owned and 0 < len(owned) < len(list(pipe.parameters()))
    for name, param in pipe.named_parameters():
        compared = [(whole(param.detach()), params[name].detach())]
        if param in kept:
            master = kept[param]
            assert master.dtype == torch.float32, name
            compared.append((whole(master), reference_optimizer.state[params[name]]["master"]))
        assert param.dtype == torch.bfloat16, name
        for got, want in compared:
            distances.append(_relative_distance(got, want))
            assert distances[-1] < PURE_RTOL, (name, distances[-1])
    from pipefold.job.report import _gather_memory

    memory = _gather_memory(pipe, [optimizer], None)  # the job report's per-rank bytes
    # A checkpoint holds each rank's bf16 weights and fp32 masters: a resumed run steps on
    # bit for bit as this one.
    import shutil
    import tempfile
    from pathlib import Path

    from pipefold.runtime.checkpoint import load_checkpoint, save_checkpoint

    shared = [tempfile.mkdtemp(prefix="pipefold-pure-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    path = Path(shared[0]) / "checkpoint"
    save_checkpoint(pipe, path, optimizer=optimizer, step=num_steps)
    resumed, _, _, _ = _layout(layout, schedule, 4, precision="bf16-pure")
    resumed_optimizer = make_optimizer(resumed)
    load_checkpoint(resumed, path, optimizer=resumed_optimizer)
    inputs, targets = _batch(kind, rows, seed=num_steps)
    if length is not None:
        inputs, targets = inputs[:, :length], targets[:, :length]
    shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
    after = []
    for run, run_optimizer in ((pipe, optimizer), (resumed, resumed_optimizer)):
        after.append(run.step(inputs[shard], targets[shard]))
        run_optimizer.step()
        run_optimizer.zero_grad()
    assert after[0] == after[1], after
    if zero:  # the loaded state lives once, in the local optimizer (no bf16 copy beside it)
        assert not resumed_optimizer.state, resumed_optimizer.state.keys()
    kept, resumed_kept = masters(optimizer), masters(resumed_optimizer)
    assert len(kept) == len(resumed_kept) > 0
    for (name, param), other in zip(pipe.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(whole(param.detach()), whole(other.detach())), name
        assert (param in kept) == (other in resumed_kept), name
        if param in kept:
            assert resumed_kept[other].dtype == torch.float32, name
            assert torch.equal(whole(kept[param]), whole(resumed_kept[other])), name
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(shared[0])
    return {"losses": losses, "distance": max(distances), "memory": memory}


def fp16_overflow(*, inject_rank: int, scale: float = 2.0**12) -> dict:
    """dp2 x pp2 in fp16 with a dynamic loss scale. Steps 0 and 2 equal the one-process model
    under the same autocast and scale; at step 1 an inf in one parameter's gradient on world rank
    `inject_rank` (one stage of one replica) makes every rank drop that step's contribution (the
    gradients stay those of step 0) and halve the scale."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(1234)
    kind = "transformer"
    pipe = Pipeline(
        transformer(), loss_fn=_loss_fn(kind), schedule="1f1b", num_microbatches=4,
        layout=LayoutOptions(seed=7),
        parallel=ParallelOptions(process_group=init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))),
        runtime=RuntimeOptions(
            timeout_s=60, precision="fp16", loss_scale=scale, loss_scale_growth_interval=100
        ),
    )
    reference = build_reference(transformer(), seed=7)
    params = dict(reference.named_parameters())
    loss_fn = _loss_fn(kind)
    rows = 8
    scales, skipped = [], []
    for step in range(3):
        inputs, targets = _batch(kind, rows, seed=step)
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        used = pipe.loss_scale.scale
        before = {name: p.grad.clone() for name, p in pipe.named_parameters()} if step == 1 else {}
        handle = None
        if step == 1 and dist.get_rank() == inject_rank:
            handle = next(pipe.parameters()).register_hook(lambda grad: torch.full_like(grad, math.inf))
        loss = pipe.step(inputs[shard], targets[shard])
        if handle is not None:
            handle.remove()
        scales.append(pipe.loss_scale.scale)
        skipped.append(pipe.loss_scale.skipped)
        if step == 1:
            for name, param in pipe.named_parameters():
                assert torch.equal(param.grad, before[name]), name
        else:
            expected = loss_fn(_autocast_forward(reference, inputs, pipe, torch.float16), targets)
            (expected * used).backward()
            torch.testing.assert_close(loss, expected.item(), rtol=BF16_RTOL, atol=0)
            for name, param in pipe.named_parameters():
                want = params[name].grad / used
                torch.testing.assert_close(
                    param.grad, want, rtol=BF16_RTOL, atol=BF16_RTOL * want.abs().max().item(),
                    msg=lambda m, n=name: f"{n}: {m}",
                )
        if step != 0:
            for module in (pipe, reference):
                for param in module.parameters():
                    param.grad = None
    return {"scales": scales, "skipped": skipped}


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


@pytest.mark.parametrize(
    ("layout", "schedule"),
    [("pp2", "1f1b"), ("pp2", "zb-v"), ("dp2xpp2", "zb-h1")],
)
def test_bf16_equals_one_process_under_autocast(pool4, layout, schedule):
    results = pool4.run("precision", layout=layout, schedule=schedule)
    for result in results:
        # The split backward (zb-*) and its direct weight gradients meet autocast here too.
        # Without autocast the pipeline's gradients would be the fp32 model's (near == far).
        assert result["near"] < 0.5 * result["far"], result
        # Floating boundary tensors in half the bytes; every rank sends less (the bool mask of
        # this model travels as is, and each tensor is 64-byte aligned in shared memory).
        assert 2 * result["bf16_floating"] == result["fp32_floating"] > 0, result
        assert 0 < result["bf16_bytes"] < result["fp32_bytes"], result


@pytest.mark.parametrize(("layout", "schedule"), [("dp2xpp2", "zb-h1"), ("pp2xtp2", "1f1b")])
def test_pure_bf16_equals_one_process_with_replicas_and_tensor_parallel(pool4, layout, schedule):
    results = pool4.run("pure", layout=layout, schedule=schedule)
    print(layout, "largest relative distance", max(result["distance"] for result in results))
    # Replicas and tp peers agree on the global loss of every step.
    assert all(result["losses"] == results[0]["losses"] for result in results)


def test_pure_bf16_with_full_sharding_equals_one_process(pool4):
    results = pool4.run("pure", layout="dp2xpp2-full", schedule="zb-h1")
    print("dp2xpp2-full largest relative distance", max(result["distance"] for result in results))
    assert all(result["losses"] == results[0]["losses"] for result in results)


def test_pure_bf16_with_zero1_equals_one_process(pool4):
    results = pool4.run("pure", layout="dp2xpp2-zero1", schedule="zb-h1")
    print("dp2xpp2-zero1 largest relative distance", max(result["distance"] for result in results))
    assert all(result["losses"] == results[0]["losses"] for result in results)
    # The job report's accounting: the optimizer state a rank keeps is the fp32 masters (SGD
    # without momentum keeps nothing else) of the parameters it owns. The two replicas of a
    # pipeline rank hold disjoint halves of its masters (4 bytes per bf16 weight's 2): together
    # 2x the weight bytes, each about 1/dp of that (ZeRO-1 assigns whole parameters).
    # The planner's ZeRO-1 share (pipefold.plan.shard_layout) is that half rounded up; a rank's
    # own differs from it by less than its largest parameter (here within 5%).
    from pipefold.plan.shard_layout import layout_bytes

    memory = results[0]["memory"]
    print("bf16-pure + ZeRO-1 bytes per rank", memory)
    for pipeline_rank in (0, 1):
        ranks = [entry for entry in memory if entry["pipeline_rank"] == pipeline_rank]
        assert len(ranks) == 2 and ranks[0]["weights"] == ranks[1]["weights"]
        weights = ranks[0]["weights"]
        assert sum(entry["optimizer"] for entry in ranks) == 2 * weights, ranks
        share = layout_bytes(
            weights, num_data_parallel=2, layout="zero1", optimizer_bytes_per_parameter_byte=2.0
        ).optimizer
        assert share == weights
        assert all(abs(entry["optimizer"] - share) <= 0.05 * share for entry in ranks), ranks


def test_fp16_overflow_on_one_rank_skips_the_step_everywhere(pool4):
    scale = 2.0**12
    # World rank 3: pipeline rank 1 (the last stage) of data-parallel replica 1.
    results = pool4.run("fp16_overflow", inject_rank=3, scale=scale)
    for result in results:
        assert result["skipped"] == [False, True, False], result
        assert result["scales"] == [scale, scale / 2, scale / 2], result
