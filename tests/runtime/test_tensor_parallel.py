"""Tensor parallel x pipeline parallel: layers split over "tp" give one process's gradients.

Four ranks start once for the module and form a ("pp", "tp") = (2, 2) mesh. Every case
builds the same layers, splits each MLP block's two linears column- then row-wise over
"tp" (Megatron's split), runs two steps without zeroing, and checks on every rank that the
loss and every gradient (a shard's gathered whole) equal a single-process reference.
The rank-side functions live in this module (`WorkerPool(..., cases=__name__)`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _cases import DIM, SEQ, VOCAB, _batch, _loss_fn
from _workers import WorkerPool
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import LayerSpec, TiedLayerSpec, build_reference
from pipefold.model.zoo import gpt_layers
from pipefold.runtime import (
    LayoutOptions,
    ParallelOptions,
    Pipeline,
    RuntimeOptions,
    gpt_tensor_parallel_plan,
)
from pipefold.runtime.parallel.tensor_parallel import check_plan, is_sharded, local, plan_for


def _pool(world_size):
    return WorkerPool(world_size, cases=__name__)  # the ranks run this module's functions


@pytest.fixture(scope="module")
def pool4():
    pool = _pool(4)
    yield pool
    pool.close()


class MegatronBlock(nn.Module):
    """x + fc2(tanh(fc1(norm(x)))): fc1 splits by columns, fc2 by rows, norm stays whole."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


def megatron_mlp(num_blocks: int = 4) -> list:
    return [LayerSpec(nn.Linear, 6, DIM), *[LayerSpec(MegatronBlock, DIM) for _ in range(num_blocks)]] + [
        LayerSpec(nn.Linear, DIM, 3)
    ]


def _embed(embedding: nn.Module, tokens):
    return embedding(tokens)


def _head(embedding: nn.Module, hidden):
    return hidden @ embedding.weight.T


def tied_lm(num_blocks: int = 4) -> list:
    """A tied embedding / head (kept whole) around Megatron blocks (split)."""
    return [
        TiedLayerSpec("embed", nn.Embedding, VOCAB, DIM, forward_fn=_embed),
        *[LayerSpec(MegatronBlock, DIM) for _ in range(num_blocks)],
        TiedLayerSpec("embed", nn.Embedding, VOCAB, DIM, forward_fn=_head),
    ]


def _plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()}


def gpt(num_blocks: int = 2) -> list:
    """The built-in GPT, 4 heads of 4 (2 per tp rank), tied embedding and head."""
    return gpt_layers(VOCAB, 16, 4, num_blocks, SEQ)


# -- rank side -------------------------------------------------------------------------------------


def _mesh(num_dp: int = 1):
    from torch.distributed.device_mesh import init_device_mesh

    if num_dp == 1:
        return init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    return init_device_mesh("cpu", (num_dp, 2, 2), mesh_dim_names=("dp", "pp", "tp"))


def tp_exact(
    *,
    schedule,
    num_microbatches,
    num_virtual=None,
    recompute="none",
    num_steps=2,
    by_function=False,
    model="mlp",
    num_dp=1,
    sequence_parallel=False,
    length=SEQ,
    full_shard=False,
):
    """pp=2 x tp=2 (x dp) against one process: the loss and every gradient (whole, gathered
    over tp). With `num_dp` replicas each steps on its rows of the global batch. Returns too
    the shape of the input each local layer saw (its sequence length shows what crossed in)."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(1234)
    mesh = _mesh(num_dp)
    plan = gpt_tensor_parallel_plan(sequence_parallel=sequence_parallel) if model == "gpt" else _plan()
    if by_function:  # only the blocks of even index are split; the rest stay whole
        plan = lambda index, module: _plan() if index % 2 == 0 else None  # noqa: E731
    build = {"mlp": megatron_mlp, "tied": tied_lm, "gpt": gpt}[model]
    loss_fn = _loss_fn("mlp" if model == "mlp" else "transformer")
    pipe = Pipeline(
        build(),
        loss_fn=loss_fn,
        schedule=schedule,
        num_microbatches=num_microbatches,
        num_virtual=num_virtual,
        layout=LayoutOptions(recompute=recompute, seed=7),
        parallel=ParallelOptions(process_group=mesh, tensor_parallel=plan,
                                 shard="full" if full_shard else "replicate"),
        runtime=RuntimeOptions(timeout_s=60),
    )
    reference = build_reference(build(), seed=7)
    seen: dict[int, tuple[int, ...]] = {}

    def record(index, args):
        seen.setdefault(index, tuple(args[0].shape))  # returns None: the arguments stay as they are

    for index, module in pipe.local_modules.items():
        # prepend: before a tp style's own pre-hook makes the input a DTensor (of global shape).
        module.register_forward_pre_hook(lambda _m, args, i=index: record(i, args), prepend=True)
    losses = []
    rows = 8
    for step in range(num_steps):
        inputs, targets = _batch("mlp" if model == "mlp" else "transformer", rows, seed=step)
        if model != "mlp":
            inputs, targets = inputs[:, :length], targets[:, :length]
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        loss = pipe.step(inputs[shard], targets[shard])
        expected = loss_fn(reference(inputs), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        losses.append(loss)
    reference_params = dict(reference.named_parameters())
    sharded = []
    for name, param in pipe.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        grad = param.grad
        if isinstance(param, DTensor):
            sharded.append(name)
            assert isinstance(grad, DTensor)
            # The shard is the matching half of the unsplit gradient (a row-split linear's
            # bias is replicated).
            halved = grad.to_local().numel() * 2 == reference_params[name].numel()
            # Fully sharded: split over "dp" too (a quarter of a tp-split tensor, half of a whole one).
            assert full_shard or halved or all(
                placement.is_replicate() for placement in param.placements
            ), name
            grad = grad.full_tensor()
        torch.testing.assert_close(grad, reference_params[name].grad, msg=lambda m, n=name: f"{n}: {m}")
    if full_shard:  # the shards' AdamW step gives the whole model's weights
        # The norm of gradients split over "dp", "tp" and the pipeline is the whole model's.
        norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]).item()
        assert abs(pipe.gradient_scope().total_norm() - norm) < 1e-5 * norm
        # The GPT's attention key bias has a gradient of float noise only (softmax ignores it),
        # which Adam's default eps would blow up to lr-sized steps of either sign.
        eps = 1e-4 if model == "gpt" else 1e-8
        optimizer = torch.optim.Adam(pipe.parameters(), lr=0.01, eps=eps)
        expected_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, eps=eps)
        optimizer.step()
        expected_optimizer.step()
        for name, param in pipe.named_parameters():
            torch.testing.assert_close(param.full_tensor(), reference_params[name].detach(), rtol=1e-5,
                                       atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    return {
        "gathers": None if pipe.sharding is None else pipe.sharding.num_gathers,
        "pp_rank": pipe.rank,
        "tp_rank": mesh.get_local_rank("tp"),
        "dp_rank": pipe.data_parallel_rank,
        "losses": losses,
        "sharded": sharded,
        "num_timeline_ranks": pipe.last_timeline.num_ranks,
        "input_shapes": seen,
    }


def tp_weight_bytes(*, partition):
    """This tp rank's parameter bytes (its shards, and whole tensors where nothing is split)."""
    mesh = _mesh()
    pipe = Pipeline(
        gpt(), loss_fn=_loss_fn("transformer"), schedule="1f1b", num_microbatches=2,
        layout=LayoutOptions(partition=partition, seed=7),
        parallel=ParallelOptions(process_group=mesh, tensor_parallel=gpt_tensor_parallel_plan()),
        runtime=RuntimeOptions(timeout_s=60),
    )
    held = [local(param) for param in pipe.parameters()]
    return {"pp_rank": pipe.rank, "bytes": sum(t.numel() * t.element_size() for t in held)}


def _adam(params):
    return torch.optim.Adam(params, lr=0.01)


def _assert_matches(pipe, optimizer, reference, reference_optimizer):
    """`pipe`'s weights and Adam moments (gathered whole) equal the reference's, by name."""
    from pipefold.runtime.parallel.tensor_parallel import whole

    expected = dict(reference.named_parameters())
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(
            whole(param.detach()), expected[name].detach(), msg=lambda m, n=name: f"{n}: {m}"
        )
        state, expected_state = optimizer.state[param], reference_optimizer.state[expected[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                whole(state[key]), expected_state[key], msg=lambda m, n=name, k=key: f"{n} {k}: {m}"
            )


def tp_async_checkpoint(*, directory):
    """A background save at pp2 x tp2 after two Adam steps, while a third step changes the
    weights in place: it loads into a fresh pp2 x tp2 pipeline as the state of step 2."""
    from pipefold import load_checkpoint
    from pipefold.runtime.checkpoint_async import AsyncCheckpointer

    def pipeline():
        return Pipeline(
            megatron_mlp(), loss_fn=F.mse_loss, schedule="1f1b", num_microbatches=2,
            layout=LayoutOptions(seed=7),
            parallel=ParallelOptions(process_group=_mesh(), tensor_parallel=_plan()),
            runtime=RuntimeOptions(timeout_s=60),
        )

    reference = build_reference(megatron_mlp(), seed=7)
    reference_optimizer = _adam(reference.parameters())
    pipe = pipeline()
    optimizer = _adam(pipe.parameters())
    saver = AsyncCheckpointer(pipe)
    for step in range(3):
        if step == 2:
            saver.save(f"{directory}/async", optimizer=optimizer, step=2)
        inputs, targets = _batch("mlp", 8, seed=step)
        pipe.step(inputs, targets)
        optimizer.step()
        optimizer.zero_grad()
        if step < 2:
            F.mse_loss(reference(inputs), targets).backward()
            reference_optimizer.step()
            reference_optimizer.zero_grad()
    saver.wait()
    fresh = pipeline()
    fresh_optimizer = _adam(fresh.parameters())
    info = load_checkpoint(fresh, f"{directory}/async", optimizer=fresh_optimizer)
    _assert_matches(fresh, fresh_optimizer, reference, reference_optimizer)
    return {"step": info.step}


def tp_checkpoint(*, directory):
    """Save at pp2 x tp2 after two Adam steps; load into a fresh pp2 x tp2 pipeline and into a
    4-rank pipeline without tensor parallelism, save from that and load into pp2 x tp2 again:
    weights and Adam moments equal a one-process run throughout."""
    from pipefold import load_checkpoint, save_checkpoint

    def pipeline(tensor_parallel):
        return Pipeline(
            megatron_mlp(),
            loss_fn=F.mse_loss,
            schedule="1f1b",
            num_microbatches=2,
            layout=LayoutOptions(seed=7),
            parallel=ParallelOptions(
                process_group=_mesh() if tensor_parallel else None,
                tensor_parallel=_plan() if tensor_parallel else None,
            ),
            runtime=RuntimeOptions(timeout_s=60),
        )

    reference = build_reference(megatron_mlp(), seed=7)
    reference_optimizer = _adam(reference.parameters())
    pipe = pipeline(True)
    optimizer = _adam(pipe.parameters())
    for step in range(2):
        inputs, targets = _batch("mlp", 8, seed=step)
        pipe.step(inputs, targets)
        optimizer.step()
        optimizer.zero_grad()
        F.mse_loss(reference(inputs), targets).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    _assert_matches(pipe, optimizer, reference, reference_optimizer)
    save_checkpoint(pipe, f"{directory}/tp", optimizer=optimizer, step=2)

    fresh = pipeline(True)
    fresh_optimizer = _adam(fresh.parameters())
    info = load_checkpoint(fresh, f"{directory}/tp", optimizer=fresh_optimizer)
    _assert_matches(fresh, fresh_optimizer, reference, reference_optimizer)

    plain = pipeline(False)  # 4 pipeline ranks, no tp: another partition of the same layers
    plain_optimizer = _adam(plain.parameters())
    load_checkpoint(plain, f"{directory}/tp", optimizer=plain_optimizer)
    _assert_matches(plain, plain_optimizer, reference, reference_optimizer)
    save_checkpoint(plain, f"{directory}/plain", optimizer=plain_optimizer, step=2)

    again = pipeline(True)
    again_optimizer = _adam(again.parameters())
    load_checkpoint(again, f"{directory}/plain", optimizer=again_optimizer)
    _assert_matches(again, again_optimizer, reference, reference_optimizer)
    # And it trains on from there as the reference does.
    inputs, targets = _batch("mlp", 8, seed=2)
    again.step(inputs, targets)
    again_optimizer.step()
    F.mse_loss(reference(inputs), targets).backward()
    reference_optimizer.step()
    _assert_matches(again, again_optimizer, reference, reference_optimizer)
    return {"step": info.step, "sharded": any(is_sharded(p) for p in again.parameters())}


def fsdp_tp_checkpoint(*, directory):
    """Save at dp2 x pp2 x tp2, fully sharded over "dp" on top of the tp split (2-D DTensors),
    after two Adam steps; load without sharding at the same degrees, and fully sharded at
    dp4 x pp2 without tensor parallelism: weights and Adam moments equal a one-process run,
    and a third step from the second load equals the reference's."""
    from torch.distributed.device_mesh import init_device_mesh

    from pipefold import load_checkpoint, save_checkpoint

    def pipeline(shape, names, shard):
        return Pipeline(
            megatron_mlp(), loss_fn=F.mse_loss, schedule="1f1b", num_microbatches=2,
            layout=LayoutOptions(seed=7),
            parallel=ParallelOptions(
                process_group=init_device_mesh("cpu", shape, mesh_dim_names=names),
                tensor_parallel=_plan() if "tp" in names else None, shard=shard,
            ),
            runtime=RuntimeOptions(timeout_s=60),
        )

    def train(pipe, optimizer, step):
        inputs, targets = _batch("mlp", 8, seed=step)
        rows = torch.arange(8).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        pipe.step(inputs[rows], targets[rows])
        optimizer.step()
        optimizer.zero_grad()

    def train_reference(step):
        inputs, targets = _batch("mlp", 8, seed=step)
        F.mse_loss(reference(inputs), targets).backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()

    reference = build_reference(megatron_mlp(), seed=7)
    reference_optimizer = _adam(reference.parameters())
    pipe = pipeline((2, 2, 2), ("dp", "pp", "tp"), "full")
    optimizer = _adam(pipe.parameters())
    for step in range(2):
        train(pipe, optimizer, step)
        train_reference(step)
    _assert_matches(pipe, optimizer, reference, reference_optimizer)
    save_checkpoint(pipe, f"{directory}/fsdp_tp", optimizer=optimizer, step=2)

    plain = pipeline((2, 2, 2), ("dp", "pp", "tp"), "replicate")
    plain_optimizer = _adam(plain.parameters())
    load_checkpoint(plain, f"{directory}/fsdp_tp", optimizer=plain_optimizer)
    _assert_matches(plain, plain_optimizer, reference, reference_optimizer)

    other = pipeline((4, 2), ("dp", "pp"), "full")  # another dp and tp degree
    other_optimizer = _adam(other.parameters())
    info = load_checkpoint(other, f"{directory}/fsdp_tp", optimizer=other_optimizer)
    _assert_matches(other, other_optimizer, reference, reference_optimizer)
    train(other, other_optimizer, 2)
    train_reference(2)
    _assert_matches(other, other_optimizer, reference, reference_optimizer)
    return {"step": info.step, "sharded": [is_sharded(p) for p in pipe.parameters()]}


def tp_tuned(*, num_dp):
    """tune_schedule on a (dp,) pp x tp mesh: every rank ends with the same schedule and
    costs, and a Pipeline running it stays exact."""
    from pipefold.runtime import tune_schedule
    from pipefold.schedule.io import to_json

    torch.manual_seed(1234)
    mesh = _mesh(num_dp)
    options = {
        "layout": LayoutOptions(seed=7),
        "parallel": ParallelOptions(process_group=mesh, tensor_parallel=_plan()),
        "runtime": RuntimeOptions(timeout_s=60),
    }
    rows = 8
    inputs, targets = _batch("mlp", rows, seed=0)
    tuned = tune_schedule(
        megatron_mlp(), loss_fn=F.mse_loss, inputs=inputs, targets=targets, num_microbatches=4, **options
    )
    pipe = Pipeline(megatron_mlp(), loss_fn=F.mse_loss, schedule=tuned.schedule, **options)
    reference = build_reference(megatron_mlp(), seed=7)
    shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
    loss = pipe.step(inputs[shard], targets[shard])
    expected = F.mse_loss(reference(inputs), targets)
    torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
    return {"schedule": to_json(tuned.schedule), "trial_rounds": tuned.trial_rounds}


def tp_refused(*, what):
    """Configurations refused in the constructor, alike on every rank: the ConfigError's message."""
    mesh = _mesh()
    kwargs = {"loss_fn": F.mse_loss, "num_microbatches": 2, "parallel": ParallelOptions(process_group=mesh)}
    try:
        if what == "no plan":
            Pipeline(megatron_mlp(), **kwargs)
        elif what == "tied":
            tied = [
                TiedLayerSpec("block", MegatronBlock, DIM),
                LayerSpec(MegatronBlock, DIM),
                TiedLayerSpec("block", MegatronBlock, DIM),
            ]
            Pipeline(
                [LayerSpec(nn.Linear, 6, DIM), *tied, LayerSpec(nn.Linear, DIM, 3)],
                **{**kwargs, "parallel": ParallelOptions(process_group=mesh, tensor_parallel=_plan())},
            )
        elif what == "uneven sequence":
            pipe = Pipeline(
                gpt(), loss_fn=_loss_fn("transformer"), num_microbatches=2,
                parallel=ParallelOptions(
                    process_group=mesh, tensor_parallel=gpt_tensor_parallel_plan(sequence_parallel=True)
                ),
            )
            pipe.step(*_batch("transformer", 4, seed=0))  # 5 positions over 2 tp ranks
        else:
            raise ValueError(what)
    except ConfigError as error:
        return str(error)
    return None


class TwoLinears(nn.Module):
    """fc2(tanh(fc1(x))) without a residual, so a plan can leave its output a DTensor."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def gathered_linear_halves():
    """ColwiseFromSequence against torch's ColwiseParallel(input_layouts=Shard(1)) on one linear,
    through pipefold's split backward: the same output and gradients; I communicates only the
    input gradient's reduce-scatter and W only the input's all-gather; the forward keeps the
    slice, not the gathered input."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from pipefold.runtime.backward import backward_input, backward_weight
    from pipefold.runtime.memory import ActivationCounter
    from pipefold.runtime.parallel import sequence_parallel

    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    rank = mesh.get_local_rank()
    whole = torch.randn(3, 8, 6, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    calls: list[str] = []
    for name, style in (("torch", ColwiseParallel(input_layouts=Shard(1))),
                        ("pipefold", sequence_parallel.ColwiseFromSequence(sequence_dim=1))):
        torch.manual_seed(3)
        linear = parallelize_module(nn.Linear(6, 16), mesh, style)
        x = whole.tensor_split(4, dim=1)[rank].clone().requires_grad_()
        counter = ActivationCounter(linear.parameters())
        with counter.counting():
            y = linear(x * 1.0)  # not the leaf itself, as in a block (its norm comes first)
        calls.clear()
        output_grad = grad.tensor_split(4, dim=2)[rank]
        (grad_x,), state = backward_input([y], [output_grad], [x], list(linear.parameters()))
        after_input = list(calls)
        backward_weight(state)
        results[name] = {
            "y": y.detach(), "grad_x": grad_x, "saved": counter.peak,
            "grads": [p.grad.full_tensor() for p in linear.parameters()],
            "input_calls": after_input, "weight_calls": calls[len(after_input):],
        }
        if name == "torch":  # count pipefold's collectives from here on
            for fn in ("_all_gather", "_reduce_scatter"):
                original = getattr(sequence_parallel, fn)
                setattr(sequence_parallel, fn, lambda *a, _f=original, _n=fn: (calls.append(_n), _f(*a))[1])
    ours, theirs = results["pipefold"], results["torch"]
    torch.testing.assert_close(ours["y"], theirs["y"])
    torch.testing.assert_close(ours["grad_x"], theirs["grad_x"])
    for mine, expected in zip(ours["grads"], theirs["grads"], strict=True):
        torch.testing.assert_close(mine, expected)
    return {
        "input_calls": ours["input_calls"], "weight_calls": ours["weight_calls"],
        "saved": ours["saved"], "saved_torch": theirs["saved"], "slice_bytes": 3 * 2 * 6 * 4,
    }


def tp_dtensor_output():
    """A plan whose layer returns a DTensor: the stage that runs it raises before sending it."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from pipefold.errors import PipefoldError

    plan = {"fc1": ColwiseParallel(), "fc2": RowwiseParallel(use_local_output=False)}
    layers = [LayerSpec(nn.Linear, 6, DIM), LayerSpec(TwoLinears, DIM), LayerSpec(nn.Linear, DIM, 3)]
    pipe = Pipeline(
        layers,
        loss_fn=F.mse_loss,
        num_microbatches=2,
        parallel=ParallelOptions(process_group=_mesh(), tensor_parallel=plan),
        runtime=RuntimeOptions(timeout_s=30),
    )
    inputs, targets = _batch("mlp", 4, seed=0)
    try:
        pipe.step(inputs, targets)
    except PipefoldError as error:
        return type(error).__name__, str(error)
    return None, ""


# -- single process ---------------------------------------------------------------------------------


def test_a_plan_needs_a_tp_dim_and_the_right_types():
    with pytest.raises(ConfigError, match="not a DeviceMesh with a 'tp' dim"):
        Pipeline(megatron_mlp(), loss_fn=F.mse_loss, parallel=ParallelOptions(tensor_parallel=_plan()))
    with pytest.raises(ConfigError, match="ParallelStyle instances"):
        check_plan({"fc1": "colwise"}, _FakeTpMesh())
    with pytest.raises(ConfigError, match="non-empty mapping"):
        check_plan({}, _FakeTpMesh())


class _FakeTpMesh:
    mesh_dim_names = ("pp", "tp")

    def get_group(self, name=None):
        raise AssertionError("not used")


def test_plan_entries_apply_to_the_layers_that_have_those_submodules():
    plan = _plan()
    assert set(plan_for(plan, 1, MegatronBlock(4))) == {"fc1", "fc2"}
    assert plan_for(plan, 0, nn.Linear(6, 4)) == {}
    nested = nn.Sequential()
    nested.add_module("mlp", MegatronBlock(4))
    assert set(plan_for({"mlp.fc*": plan["fc1"]}, 3, nested)) == {"mlp.fc*"}
    with pytest.raises(ConfigError, match=r"tensor_parallel\(layer 2\) returned 'x'"):
        plan_for(lambda index, module: "x", 2, MegatronBlock(4))


# -- four ranks -------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "num_virtual", "recompute"),
    [
        ("gpipe", None, "none"),
        ("1f1b", None, "none"),
        ("1f1b", None, "full"),
        ("interleaved-1f1b", 2, "none"),
        ("zb-h1", None, "none"),
        ("zb-v", None, "none"),
        ("dualpipe-v", None, "none"),
    ],
)
def test_pp2_by_tp2_equals_one_process(pool4, schedule, num_virtual, recompute):
    results = pool4.run(
        "tp_exact", schedule=schedule, num_microbatches=4, num_virtual=num_virtual, recompute=recompute
    )
    assert [(r["pp_rank"], r["tp_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["losses"] == results[0]["losses"] for r in results), "ranks disagree on the loss"
    assert all(r["num_timeline_ranks"] == 2 for r in results)
    # Every block's fc1 / fc2 weight and bias is sharded, on both tp ranks of its stage.
    sharded = sorted({name for r in results for name in r["sharded"]})
    assert [name for name in sharded if name.endswith(".weight")] == [
        f"{i}.{fc}.weight" for i in range(1, 5) for fc in ("fc1", "fc2")
    ]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "num_virtual"), [("1f1b", None), ("zb-v", None), ("interleaved-1f1b", 3)]
)
def test_the_gpt_splits_attention_by_heads_and_equals_one_process(pool4, schedule, num_virtual):
    """gpt_tensor_parallel_plan: each rank holds 2 of the 4 heads (q, k and v of each) and
    half of the MLP; with split backward (zb-v) W computes the sharded weights' gradients."""
    results = pool4.run(
        "tp_exact", schedule=schedule, num_microbatches=4, num_virtual=num_virtual, model="gpt"
    )
    assert all(r["losses"] == results[0]["losses"] for r in results)
    sharded = sorted({name for r in results for name in r["sharded"]})
    assert [name for name in sharded if name.endswith(".weight")] == [
        f"{i}.{part}.weight" for i in (2, 3) for part in ("attn.head_qkv", "attn.proj", "fc", "fc_out")
    ]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "num_virtual", "recompute"),
    [("1f1b", None, "none"), ("zb-v", None, "none"), ("interleaved-1f1b", 3, "none"), ("1f1b", None, "full")],
)
def test_sequence_parallel_gpt_equals_one_process_and_sends_half_the_sequence(
    pool4, schedule, num_virtual, recompute
):
    """gpt_tensor_parallel_plan(sequence_parallel=True): between the position embedding and
    the final norm each tp rank holds half of the 4 positions, also across stage boundaries
    (a block on pp rank 1 receives 2 positions), and the loss and every gradient, the norms'
    replicated weights included, equal one process's."""
    results = pool4.run(
        "tp_exact", schedule=schedule, num_microbatches=4, num_virtual=num_virtual, model="gpt",
        sequence_parallel=True, length=4, recompute=recompute,
    )
    assert all(r["losses"] == results[0]["losses"] for r in results)
    lengths = {index: shape[1] for r in results for index, shape in r["input_shapes"].items()}
    # Layers: 0 token embedding, 1 position embedding, 2-3 blocks, 4 final norm, 5 the tied
    # head (it reads the embedding's weight; the hook on the module it shares with layer 0
    # sees the token ids where both are on one rank).
    assert lengths.pop(5, 4) == 4
    assert lengths == {0: 4, 1: 4, 2: 2, 3: 2, 4: 2}
    pp1_inputs = {i for r in results if r["pp_rank"] == 1 for i in r["input_shapes"]}
    assert pp1_inputs & {2, 3, 4}, "no sharded boundary crossed to pp rank 1"


@pytest.mark.multiprocess
def test_the_sequence_gathering_linear_keeps_the_slice_and_splits_its_communication(pool4):
    results = pool4.run("gathered_linear_halves")
    for result in results:
        assert result["input_calls"] == ["_reduce_scatter"]  # I: no all-gather
        assert result["weight_calls"] == ["_all_gather"]  # W: the input again, no input gradient
        assert result["saved"] == result["slice_bytes"]  # the 2 positions, not the 8 gathered
        assert result["saved_torch"] == 4 * result["slice_bytes"]


@pytest.mark.multiprocess
def test_the_planner_prices_a_tp_rank_s_weights_as_the_runtime_holds_them(pool4):
    """The planner's tp=2 cost model of the GPT (pipefold.plan.tensor) against the bytes each
    tp rank of a pp=2 x tp=2 pipeline really holds, for the partition the planner chose."""
    from pipefold.plan import PlanOptions, gpt_costs, plan

    costs = gpt_costs(num_layers=2, d_model=16, num_heads=4, seq_len=SEQ, vocab_size=VOCAB)
    options = PlanOptions(num_ranks=2, global_batch=4, tensor_parallel=2, schedules=("1f1b",),
                          order_search_s=0)
    choice = plan(costs, options).choice
    assert choice.num_tensor_parallel == 2
    results = pool4.run("tp_weight_bytes", partition=list(choice.partition.counts))
    for result in results:
        assert result["bytes"] == choice.memory[result["pp_rank"]].weights


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_tied_layers_the_plan_leaves_whole_stay_tied(pool4, schedule):
    results = pool4.run("tp_exact", schedule=schedule, num_microbatches=2, model="tied")
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert sorted({name.split(".")[0] for r in results for name in r["sharded"]}) == ["1", "2", "3", "4"]


@pytest.mark.multiprocess
def test_a_plan_function_splits_only_the_layers_it_names(pool4):
    results = pool4.run("tp_exact", schedule="1f1b", num_microbatches=2, by_function=True)
    sharded = sorted({name.split(".")[0] for r in results for name in r["sharded"]})
    assert sharded == ["2", "4"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("what", "words"),
    [
        ("no plan", "'tp' dim but tensor_parallel is None"),
        ("tied", "splits the tied layer 'block'"),
        ("uneven sequence", "a sequence of 5 positions does not split evenly over 2"),
    ],
)
def test_what_tensor_parallelism_does_not_compose_with_is_refused(pool4, what, words):
    messages = pool4.run("tp_refused", what=what)
    assert all(message is not None and words in message for message in messages), messages


@pytest.mark.multiprocess
def test_checkpoints_hold_whole_tensors_and_load_into_any_tp_degree(pool4, tmp_path):
    results = pool4.run("tp_checkpoint", directory=str(tmp_path))
    assert results == [{"step": 2, "sharded": True}] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "tp"]  # no staging directory left


@pytest.mark.multiprocess
def test_an_async_save_with_tensor_parallelism_holds_its_step(pool4, tmp_path):
    assert pool4.run("tp_async_checkpoint", directory=str(tmp_path)) == [{"step": 2}] * 4


@pytest.mark.multiprocess
def test_a_tuned_schedule_is_the_same_on_every_tp_rank(pool4):
    # Each pipeline's rank 0 measures its own probe steps; the first pipeline's choice is
    # broadcast to its tp peers, which would otherwise deadlock on differing orders.
    results = pool4.run("tp_tuned", num_dp=1, timeout_s=300)
    assert all(r == results[0] for r in results)


@pytest.mark.multiprocess
def test_a_tuned_schedule_is_the_same_in_every_replica_and_tp_rank(pool8):
    results = pool8.run("tp_tuned", num_dp=2, timeout_s=300)
    assert all(r == results[0] for r in results)


@pytest.mark.multiprocess
def test_a_layer_that_returns_a_dtensor_is_named(pool4):
    results = pool4.run("tp_dtensor_output")
    # Layers 0-1 are stage 0 (pp rank 0: world ranks 0 and 1); its tp ranks raise, stage 1's hear of it.
    assert [kind for kind, _ in results[:2]] == ["ConfigError", "ConfigError"]
    assert all("layer 1 (the last of stage 0) returns a DTensor" in message for _, message in results[:2])
    assert all(kind is not None for kind, _ in results[2:])


@pytest.fixture(scope="module")
def pool8():
    pool = _pool(8)
    yield pool
    pool.close()


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["1f1b", "zb-v"])
def test_dp2_by_pp2_by_tp2_equals_one_process_on_the_global_batch(pool8, schedule):
    """3D: eight ranks, each replica on its half of the global batch."""
    results = pool8.run("tp_exact", schedule=schedule, num_microbatches=2, num_dp=2, timeout_s=300)
    coordinates = [(r["dp_rank"], r["pp_rank"], r["tp_rank"]) for r in results]
    assert coordinates == [(d, p, t) for d in range(2) for p in range(2) for t in range(2)]
    assert all(r["losses"] == results[0]["losses"] for r in results), "ranks disagree on the global loss"


@pytest.mark.multiprocess
def test_full_sharding_with_tensor_parallelism_equals_one_process(pool8):
    """dp=2 x pp=2 x tp=2, each stage fully sharded over "dp" on top of its tp split (2-D DTensors),
    zb-h1's split backward: loss, every gradient, then the weights after an Adam step. Then the
    GPT under zb-v: its tied embedding and head on pipeline rank 0, one FSDP unit there."""
    results = pool8.run(
        "tp_exact", schedule="zb-h1", num_microbatches=2, num_dp=2, full_shard=True, timeout_s=300
    )
    assert all(r["losses"] == results[0]["losses"] for r in results), "ranks disagree on the global loss"
    assert [r["gathers"] for r in results] == [2] * 8  # one per stage per step, two steps
    results = pool8.run(
        "tp_exact", schedule="zb-v", num_microbatches=2, num_dp=2, full_shard=True, model="gpt", timeout_s=300
    )
    assert all(r["losses"] == results[0]["losses"] for r in results), "ranks disagree on the global loss"
    # One per unit per step: stages 0 and 3 together on pipeline rank 0, 1 and 2 apart on rank 1.
    assert [r["gathers"] for r in results] == [2 * (1 + r["pp_rank"]) for r in results]


def fsdp_bytes_dp4() -> dict:
    """dp=4 x pp=2 under full sharding (no tp): the bytes this rank holds after an AdamW step
    (weights and optimizer state) and after the next step's reduce-scatter (gradients), and what
    `pipefold.plan.shard_layout` counts for its stages. Every sharded dim divides by 4, so FSDP
    pads nothing and the figures are exact."""
    from torch.distributed.device_mesh import init_device_mesh

    from pipefold.plan.shard_layout import layout_bytes

    layers = [LayerSpec(nn.Linear, 6, 16), *[LayerSpec(MegatronBlock, 16) for _ in range(2)],
              LayerSpec(nn.Linear, 16, 4)]
    mesh = init_device_mesh("cpu", (4, 2), mesh_dim_names=("dp", "pp"))
    pipe = Pipeline(layers, loss_fn=F.mse_loss, schedule="1f1b", num_microbatches=2,
                    layout=LayoutOptions(seed=3), parallel=ParallelOptions(process_group=mesh, shard="full"))
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 4, generator=generator)
    shard = torch.arange(16).tensor_split(4)[pipe.data_parallel_rank]
    pipe.step(x[shard], y[shard])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pipe.step(x[shard], y[shard])
    params = [param for _, param in pipe.named_parameters()]
    state = [v for st in optimizer.state.values() for v in st.values()
             if isinstance(v, torch.Tensor) and v.dim() > 0]
    whole = sum(p.numel() * p.element_size() for p in params)
    planned = layout_bytes(whole, num_data_parallel=4, layout="full")
    return {
        "measured": (sum(p.to_local().numel() * p.element_size() for p in params),
                     sum(p.grad.to_local().numel() * p.grad.element_size() for p in params),
                     sum(v.to_local().numel() * v.element_size() for v in state)),
        "planned": (planned.weights, planned.gradients, planned.optimizer),
        "whole": whole,
    }


@pytest.mark.multiprocess
def test_a_checkpoint_under_full_sharding_and_tensor_parallelism_resumes_plain_and_at_dp4(pool8, tmp_path):
    results = pool8.run("fsdp_tp_checkpoint", directory=str(tmp_path), timeout_s=300)
    assert [r["step"] for r in results] == [2] * 8
    assert all(all(r["sharded"]) for r in results)  # every weight was a shard (over dp, or dp x tp)


@pytest.mark.multiprocess
def test_full_sharding_at_dp4_holds_the_planners_bytes(pool8):
    """dp=4 x pp=2: each rank's weights, gradients and AdamW state are plan.shard_layout's 1/4."""
    results = pool8.run("fsdp_bytes_dp4", timeout_s=300)
    for result in results:
        assert result["measured"] == result["planned"]
        assert result["planned"][0] * 4 == result["whole"] > 0  # a quarter, not a rounding of it
