"""Data parallel x pipeline parallel: replicas along "dp" give the gradients of the global batch.

Four ranks start once for the module. Every case gives each replica its own rows of
one global batch, runs two steps without zeroing (accumulation), and checks on every
rank that the loss and each local gradient equal a single-process reference run on
the whole global batch (`dp_exact`). The rank-side functions live in this module:
the pool's ranks run them in place of `_cases` (`WorkerPool(..., cases=__name__)`).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _cases import DIM, Block, Sometimes, _batch, _loss_fn, mlp, transformer
from _workers import WorkerPool
from torch import nn

from pipefold.errors import ConfigError, PeerFailure, PipefoldError
from pipefold.model import LayerSpec, build_reference
from pipefold.plan.shard_layout import layout_bytes
from pipefold.runtime import (
    LayoutOptions,
    ParallelOptions,
    Pipeline,
    RuntimeOptions,
    TransportOptions,
    load_checkpoint,
    save_checkpoint,
)
from pipefold.runtime.measured import measured_cost_model
from pipefold.runtime.parallel.data_parallel import _buckets, _by_stage, split_mesh
from pipefold.schedule import gathers_per_step


def _pool(world_size):
    return WorkerPool(world_size, cases=__name__)  # the ranks run this module's functions


@pytest.fixture(scope="module")
def pool4():
    pool = _pool(4)
    yield pool
    pool.close()


# -- rank side -------------------------------------------------------------------------------------


def _groups(dims, shape, explicit):
    """(process_group, data_parallel_group) for Pipeline: a mesh of `shape` named `dims`, or
    (explicit) groups built by hand for `shape` = (dp, pp) or (independent jobs, dp, pp)."""
    from torch.distributed.device_mesh import init_device_mesh

    if not explicit:
        return init_device_mesh("cpu", shape, mesh_dim_names=dims), None
    grid = torch.arange(dist.get_world_size()).reshape((1, *shape)[-3:]).tolist()
    me = dist.get_rank()
    pipeline_group = data_parallel_group = None
    # new_group is collective over the world: every rank creates every group, in one order.
    for job in grid:
        for ranks in job:  # one pipeline per (job, dp)
            group = dist.new_group(ranks)
            if me in ranks:
                pipeline_group = group
        for ranks in zip(*job, strict=True):  # one data-parallel group per (job, pp)
            group = dist.new_group(list(ranks))
            if me in ranks:
                data_parallel_group = group
    return pipeline_group, data_parallel_group


def dp_exact(
    *,
    schedule,
    num_microbatches,
    model="mlp",
    rows=12,
    dims=("dp", "pp"),
    shape=(2, 2),
    explicit=False,
    num_virtual=None,
    shared_memory=True,
    bucket_bytes=None,
    num_steps=2,
    overlap=True,
):
    """Each replica steps on its contiguous rows of a `rows`-row global batch (uneven when
    `rows` does not divide); loss and gradients equal the reference on the whole batch."""
    torch.manual_seed(1234)
    process_group, data_parallel_group = _groups(dims, shape, explicit)
    build = mlp if model == "mlp" else transformer
    loss_fn = _loss_fn(model)
    pipe = Pipeline(
        build(),
        loss_fn=loss_fn,
        schedule=schedule,
        num_microbatches=num_microbatches,
        num_virtual=num_virtual,
        layout=LayoutOptions(seed=7),
        parallel=ParallelOptions(
            process_group=process_group, data_parallel_group=data_parallel_group, overlap_reduction=overlap
        ),
        runtime=RuntimeOptions(timeout_s=60),
        transport=TransportOptions(shared_memory=shared_memory),
    )
    if bucket_bytes is not None:  # tiny buckets: several all-reduces per step
        data_parallel = pipe.data_parallel
        data_parallel._buckets = _buckets(data_parallel._params, bucket_bytes)
        if overlap:
            stages = {stage.index: stage.parameters for stage in pipe.stages}
            data_parallel._stage_buckets = _by_stage(data_parallel._params, stages, bucket_bytes)
    # (A rank holding both ends of a tied embedding, zb-v's rank 0, reduces after the schedule.)
    assert pipe.data_parallel is None or overlap or not pipe.data_parallel.overlaps
    reference = build_reference(build(), seed=7)
    losses = []
    for step in range(num_steps):
        inputs, targets = _batch(model, rows, seed=step)
        shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        loss = pipe.step(inputs[shard], targets[shard])
        expected = loss_fn(reference(inputs), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        losses.append(loss)
    reference_params = dict(reference.named_parameters())
    names = []
    for name, param in pipe.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        torch.testing.assert_close(param.grad, reference_params[name].grad, msg=lambda m, n=name: f"{n}: {m}")
        names.append(name)
    data_parallel = pipe.data_parallel
    return {
        "rank": pipe.rank,
        "dp_rank": pipe.data_parallel_rank,
        "num_dp": pipe.num_data_parallel,
        "losses": losses,
        "names": names,
        "num_buckets": 0 if data_parallel is None else data_parallel.num_buckets,
        "overlaps": data_parallel is not None and data_parallel.overlaps,
        "same_host_peers": [] if pipe.p2p is None else list(pipe.p2p.same_host_peers),
        "num_timeline_ranks": pipe.last_timeline.num_ranks,
        "timeline_cores": pipe.last_timeline.meta.get("num_cores"),
    }


def dp_skip_nonfinite():
    """A NaN target on replica 1 only: every rank skips the step and keeps its gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    pipe = Pipeline(
        mlp(4),
        loss_fn=F.mse_loss,
        schedule="gpipe",
        num_microbatches=2,
        layout=LayoutOptions(seed=3),
        parallel=ParallelOptions(process_group=mesh),
        runtime=RuntimeOptions(on_nonfinite="skip"),
    )
    reference = build_reference(mlp(4), seed=3)
    inputs, targets = _batch("mlp", 8, seed=0)
    shard = slice(4 * pipe.data_parallel_rank, 4 * pipe.data_parallel_rank + 4)
    pipe.step(inputs[shard], targets[shard])
    before = {name: p.grad.clone() for name, p in pipe.named_parameters()}
    bad_targets = targets.clone()
    bad_targets[5, 0] = float("nan")  # row 5 belongs to replica 1
    skipped_loss = pipe.step(inputs[shard], bad_targets[shard])
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, before[name])
    # Still usable, and still exact: step 1 + step 3 accumulated.
    pipe.step(inputs[shard], targets[shard])
    for _ in range(2):
        F.mse_loss(reference(inputs), targets).backward()
    reference_params = dict(reference.named_parameters())
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, reference_params[name].grad)
    return {"skipped_loss": skipped_loss}


class _FakeMesh:
    """Just enough of a DeviceMesh for `split_mesh`'s checks."""

    def __init__(self, names, shape):
        self.mesh_dim_names = names
        self.shape = shape

    def size(self):
        return int(torch.tensor(self.shape).prod())

    def get_group(self, name=None):
        return object()  # never used as a group: every case here is refused first


def dp_refused(*, what):
    """Configurations refused in the constructor, alike on every rank: the ConfigError's message."""
    from torch.distributed.device_mesh import init_device_mesh

    kwargs = {"loss_fn": F.mse_loss, "num_microbatches": 2}
    try:
        if what == "mesh size":
            mesh = _FakeMesh(("dp", "pp"), (1, 2))
            Pipeline(mlp(4), parallel=ParallelOptions(process_group=mesh), **kwargs)
        elif what == "dp group of different stages":
            # Pipeline ranks 0 and 1 of one replica passed as each other's replicas.
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
            pp = mesh.get_group("pp")
            Pipeline(mlp(4), parallel=ParallelOptions(process_group=pp, data_parallel_group=pp), **kwargs)
        else:
            raise ValueError(what)
    except ConfigError as error:
        return str(error)
    return None


def dp_failing():
    """Pipeline rank 1 of replica 1 raises in its forward; every rank stops, none hangs."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    dp_rank = mesh.get_local_rank("dp")
    how = "raise" if dp_rank == 1 else "pass"
    layers = [LayerSpec(Block, 6, DIM), LayerSpec(Block, DIM, DIM), LayerSpec(Sometimes, DIM, how)]
    layers.append(LayerSpec(nn.Linear, DIM, 3))
    pipe = Pipeline(
        layers, loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=2,
        parallel=ParallelOptions(process_group=mesh), runtime=RuntimeOptions(timeout_s=60),
    )
    inputs, targets = _batch("mlp", 4, seed=0)
    start = time.monotonic()
    try:
        pipe.step(inputs, targets)
    except PipefoldError as error:
        return {
            "type": type(error).__name__,
            "message": str(error),
            "elapsed": time.monotonic() - start,
            "peer_failure": isinstance(error, PeerFailure),
        }
    return {"type": None, "message": "", "elapsed": time.monotonic() - start, "peer_failure": False}


def fsdp_exact(*, schedule, num_virtual=None, rows=12, num_microbatches=3, adam_steps=2, recompute="none",
               free_between=False, lookahead=0):
    """Full sharding (FSDP2 per stage, driven by the schedule) at dp=2 x pp=2: two accumulated
    steps give the reference's loss and every gradient; then AdamW steps give its weights.
    Counts FSDP's real all-gathers and reduce-scatters per step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fsdp_group

    counts = {"all_gather": 0, "reduce": 0}
    originals = (fsdp_group.foreach_all_gather, fsdp_group.foreach_reduce)

    def counted(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)
        return wrapper

    fsdp_group.foreach_all_gather = counted("all_gather", originals[0])
    fsdp_group.foreach_reduce = counted("reduce", originals[1])
    try:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
        loss_fn = _loss_fn("mlp")
        pipe = Pipeline(
            mlp(), loss_fn=loss_fn, schedule=schedule, num_microbatches=num_microbatches,
            num_virtual=num_virtual, layout=LayoutOptions(seed=7, recompute=recompute),
            parallel=ParallelOptions(process_group=mesh, shard="full", free_between_microbatches=free_between,
                                     gather_lookahead=lookahead),
            runtime=RuntimeOptions(timeout_s=60),
        )
        reference = build_reference(mlp(), seed=7)
        reference_params = dict(reference.named_parameters())
        per_step = []

        def step(seed):
            inputs, targets = _batch("mlp", rows, seed=seed)
            shard = torch.arange(rows).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
            before = dict(counts)
            loss = pipe.step(inputs[shard], targets[shard])
            per_step.append({k: counts[k] - before[k] for k in counts})
            expected = loss_fn(reference(inputs), targets)
            expected.backward()
            torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)

        for seed in range(2):  # accumulated: no zeroing in between
            step(seed)
        at_rest = {}
        for name, param in pipe.named_parameters():
            # At rest each replica holds its half of every weight and gradient (Shard(0) over "dp").
            at_rest[name] = (param.to_local().numel(), param.numel())
            torch.testing.assert_close(param.grad.full_tensor(), reference_params[name].grad,
                                       msg=lambda m, n=name: f"{n}: {m}")
        # The norm of gradients split over the replicas (and the pipeline) is the whole model's.
        norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        assert abs(pipe.gradient_scope().total_norm() - norm.item()) < 1e-5 * norm.item()
        optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.01)
        expected_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01)
        optimizer.zero_grad(set_to_none=True)
        expected_optimizer.zero_grad(set_to_none=True)
        for seed in range(2, 2 + adam_steps):
            step(seed)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            expected_optimizer.step()
            expected_optimizer.zero_grad(set_to_none=True)
        for name, param in pipe.named_parameters():
            torch.testing.assert_close(param.full_tensor(), reference_params[name].detach(),
                                       rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        state = sum(v.to_local().numel() for st in optimizer.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0)
        # The planner's per-rank figures for this rank's stages (fp32: 4 bytes an element).
        params = [param for _, param in pipe.named_parameters()]
        planned = layout_bytes(sum(4 * p.numel() for p in params), num_data_parallel=2, layout="full")
        step(99)  # gradients of one more step, reduce-scattered into the shards
        measured = (sum(4 * p.to_local().numel() for p in params),
                    sum(4 * p.grad.to_local().numel() for p in params), 4 * state)
        # FSDP splits each tensor's first dim unevenly where dp does not divide it (the Linear(8, 3)
        # head): a replica holds up to one row per tensor more or less than 1/dp of the bytes.
        padding = sum(4 * (p.numel() // p.shape[0]) for p in params)
        costs = measured_cost_model(pipe.last_timeline, pipe.running_schedule, with_link=False)
        return {
            "measured_costs": (costs.gather, costs.reduce_scatter),
            "padding": padding,
            "planned": (planned.weights, planned.gradients, planned.optimizer),
            "measured": measured,
            "rank": pipe.rank,
            "dp_rank": pipe.data_parallel_rank,
            "per_step": per_step,
            "num_stages": len(pipe.sharding.stages),
            "gathers": pipe.sharding.num_gathers,
            # The measured timeline shows the schedule's sharding actions of this rank.
            "timeline": sorted(
                str(e.action) for e in pipe.last_timeline.events[pipe.rank] if e.action.op.is_sharding
            ),
            "expected_timeline": sorted(
                str(a) for a in pipe.sharding.schedule(pipe.schedule).actions[pipe.rank] if a.op.is_sharding
            ),
            # What the schedule says this rank gathers per step.
            "scheduled": sum(
                count
                for stage, count in gathers_per_step(pipe.sharding.schedule(pipe.schedule)).items()
                if stage in pipe.sharding.stages
            ),
            "at_rest": at_rest,
            "state_numel": state,
        }
    finally:
        fsdp_group.foreach_all_gather, fsdp_group.foreach_reduce = originals


def fsdp_checkpoint(*, directory):
    """Two AdamW steps fully sharded, saved; loaded fully sharded at dp=2 x pp=2 and into 4 pipeline
    ranks without replicas, one more step of each equals one process's third step."""
    from torch.distributed.device_mesh import init_device_mesh

    def pipeline(shape, names, shard):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        return Pipeline(
            mlp(), loss_fn=_loss_fn("mlp"), schedule="1f1b", num_microbatches=2, layout=LayoutOptions(seed=7),
            parallel=ParallelOptions(process_group=mesh, shard=shard), runtime=RuntimeOptions(timeout_s=60),
        )

    def train(pipe, optimizer, seeds):
        for seed in seeds:
            inputs, targets = _batch("mlp", 8, seed=seed)
            shard = torch.arange(8).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
            pipe.step(inputs[shard], targets[shard])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    reference = build_reference(mlp(), seed=7)
    adamw = torch.optim.AdamW(reference.parameters(), lr=0.01)
    for seed in range(3):
        inputs, targets = _batch("mlp", 8, seed=seed)
        _loss_fn("mlp")(reference(inputs), targets).backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    expected = dict(reference.named_parameters())

    pipe = pipeline((2, 2), ("dp", "pp"), "full")
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=0.01)
    train(pipe, optimizer, range(2))
    save_checkpoint(pipe, directory, optimizer=optimizer, step=2)
    names = sorted(pipe.state_dict())
    results = {}
    for what, shape, dims, shard in (
        ("sharded", (2, 2), ("dp", "pp"), "full"), ("plain", (4,), ("pp",), "replicate")
    ):
        again = pipeline(shape, dims, shard)
        optimizer = torch.optim.AdamW(again.parameters(), lr=0.01)
        load_checkpoint(again, directory, optimizer=optimizer)
        train(again, optimizer, [2])
        for name, param in again.named_parameters():
            value = param.full_tensor() if shard == "full" else param.detach()
            torch.testing.assert_close(value, expected[name].detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, w=what: f"{w} {n}: {m}")
        results[what] = again.rank
    return {"names": names, **results}


# -- single process ---------------------------------------------------------------------------------


def test_buckets_split_by_size_and_dtype():
    params = [nn.Parameter(torch.zeros(n)) for n in (4, 4, 4, 10, 2)]
    params.insert(3, nn.Parameter(torch.zeros(3, dtype=torch.float64)))
    buckets = _buckets(params, bucket_bytes=32)
    # 32 bytes hold eight float32 values; a dtype change or a parameter over the limit starts a bucket.
    assert [[p.numel() for p in b.params] for b in buckets] == [[4, 4], [4], [3], [10], [2]]
    assert [b.num_bytes for b in buckets] == [32, 16, 24, 40, 8]
    assert [p for b in buckets for p in b.params] == params


def test_stage_hooks_sit_at_each_stages_first_forward_and_last_backward():
    from pipefold.runtime.executor_parts import first_forward_and_last_backward
    from pipefold.schedule import build, lower

    program = lower(build("zb-v", num_ranks=2, num_microbatches=3))
    actions = program.instructions[0]  # stages 0 and 3
    firsts, lasts = first_forward_and_last_backward(actions, [0, 3])
    for stage in (0, 3):
        mine = [i for i, a in enumerate(actions) if a.stage == stage and a.op.is_compute]
        assert firsts[stage] == min(i for i in mine if actions[i].op.name == "F")
        assert lasts[stage] == max(i for i in mine if actions[i].op.name in ("B", "W"))
        assert actions[lasts[stage]].microbatch is not None


def test_overlapped_buckets_follow_the_stages_unless_a_parameter_is_shared():
    a, b, c = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    by_stage = _by_stage([a, b, c], {0: [a, b], 2: [c]}, 1 << 20)
    assert {s: [bucket.params for bucket in buckets] for s, buckets in by_stage.items()} == {
        0: [(a, b)], 2: [(c,)]
    }
    assert _by_stage([a, b, c], {0: [a, b], 2: [b, c]}, 1 << 20) == {}  # b is complete after both


@pytest.mark.parametrize(
    ("names", "words"),
    [
        (None, "dims named nothing"),
        (("dp", "model"), "dims named ('dp', 'model')"),
        (("dp", "tp", "pp"), "'tp' dim but tensor_parallel is None"),
        (("dp", "cp", "pp"), "does not implement ['cp']"),
    ],
)
def test_bad_mesh_is_refused_before_any_communication(names, words):
    shape = (1,) * (len(names) if names else 2)
    with pytest.raises(ConfigError, match="process_group") as caught:
        Pipeline(mlp(4), loss_fn=F.mse_loss, parallel=ParallelOptions(process_group=_FakeMesh(names, shape)))
    assert words in str(caught.value)


def test_a_dp_dim_and_a_data_parallel_group_are_not_both_taken():
    with pytest.raises(ConfigError, match="pass one of them"):
        split_mesh(_FakeMesh(("dp", "pp"), (1, 1)), data_parallel_group=object())


def test_data_parallel_group_must_be_a_process_group():
    with pytest.raises(ConfigError, match="data_parallel_group must be a torch.distributed ProcessGroup"):
        split_mesh(None, data_parallel_group="dp")


def test_without_data_parallelism_there_is_one_replica():
    pipe = Pipeline(mlp(4), loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=2)
    assert (pipe.data_parallel_rank, pipe.num_data_parallel) == (0, 1)


# -- four ranks -------------------------------------------------------------------------------------


def _check(results, *, num_dp, num_pp):
    assert [r["num_dp"] for r in results] == [num_dp] * len(results)
    losses = [r["losses"] for r in results]
    assert all(row == losses[0] for row in losses), "ranks disagree on the global loss"
    # Each replica holds every parameter exactly once (the tied embedding on two of its ranks).
    for dp_rank in range(num_dp):
        replica = [r for r in results if r["dp_rank"] == dp_rank]
        assert sorted(r["rank"] for r in replica) == list(range(num_pp))
        assert all(r["num_timeline_ranks"] == num_pp for r in replica)
        owned = [name for r in replica for name in r["names"]]
        assert len(set(owned)) == len(owned) - max(owned.count("0.weight") - 1, 0)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "num_virtual", "model"),
    [
        ("gpipe", None, "mlp"),
        ("gpipe", None, "transformer"),
        ("1f1b", None, "mlp"),
        ("1f1b", None, "transformer"),
        ("zb-h1", None, "transformer"),
        ("interleaved-1f1b", 2, "mlp"),
        ("zb-v", None, "transformer"),
    ],
)
def test_dp2_by_pp2_equals_one_process_on_the_global_batch(pool4, schedule, num_virtual, model):
    results = pool4.run(
        "dp_exact", schedule=schedule, num_microbatches=3, model=model, rows=12, num_virtual=num_virtual
    )
    _check(results, num_dp=2, num_pp=2)
    assert [r["dp_rank"] for r in results] == [0, 0, 1, 1]
    if model == "mlp":  # each stage's all-reduce starts after its last backward, inside the schedule
        assert all(r["overlaps"] for r in results)
    assert [r["same_host_peers"] for r in results] == [[1], [0], [1], [0]]
    # The other replica computes beside each pipeline: its timeline records the pipeline's
    # share of the host's cores, which is what the simulator replays ([Note: shared cores]).
    from pipefold.runtime.processes.cores import shared_cores

    expected_cores = shared_cores(2, threads_per_rank=1, num_host_processes=4)
    assert [r["timeline_cores"] for r in results] == [expected_cores] * 4


@pytest.mark.multiprocess
def test_uneven_shards_weigh_by_rows(pool4):
    # 9 rows: replica 0 steps on 5, replica 1 on 4; the mean is still over all 9 rows.
    results = pool4.run("dp_exact", schedule="1f1b", num_microbatches=2, model="transformer", rows=9)
    _check(results, num_dp=2, num_pp=2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("shared_memory", [True, False])
def test_pipeline_on_strided_ranks(pool4, shared_memory):
    # ("pp", "dp"): the pipelines are ranks (0, 2) and (1, 3), so pipeline rank 1 is global
    # rank 2 or 3; sends, receives, broadcasts and tied sums must address global ranks.
    results = pool4.run(
        "dp_exact",
        schedule="1f1b",
        num_microbatches=3,
        model="transformer",
        dims=("pp", "dp"),
        shared_memory=shared_memory,
    )
    _check(results, num_dp=2, num_pp=2)
    assert [(r["dp_rank"], r["rank"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    expected = [[1], [1], [0], [0]] if shared_memory else [[]] * 4
    assert [r["same_host_peers"] for r in results] == expected


@pytest.mark.multiprocess
def test_explicit_data_parallel_group(pool4):
    results = pool4.run("dp_exact", schedule="gpipe", num_microbatches=2, model="transformer", explicit=True)
    _check(results, num_dp=2, num_pp=2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("overlap", [True, False])
def test_many_buckets(pool4, overlap):
    # Overlapped: each stage's buckets all-reduced after its last backward; else after the schedule.
    results = pool4.run(
        "dp_exact", schedule="1f1b", num_microbatches=2, model="transformer", bucket_bytes=200,
        overlap=overlap,
    )
    _check(results, num_dp=2, num_pp=2)
    assert all(r["num_buckets"] > 3 for r in results), [r["num_buckets"] for r in results]


@pytest.mark.multiprocess
@pytest.mark.parametrize("explicit", [False, True])
def test_dp4_by_pp1(pool4, explicit):
    # One stage per replica: no pipeline communication, only the data-parallel average.
    results = pool4.run(
        "dp_exact", schedule="gpipe", num_microbatches=2, model="transformer", shape=(4, 1), explicit=explicit
    )
    _check(results, num_dp=4, num_pp=1)
    assert all(r["num_buckets"] == 1 for r in results)


@pytest.mark.multiprocess
def test_dp2_by_pp1_next_to_another_job(pool4):
    # Ranks (0, 1) and (2, 3) are two independent dp=2 x pp=1 jobs in one world.
    results = pool4.run(
        "dp_exact", schedule="1f1b", num_microbatches=2, model="mlp", shape=(2, 2, 1), explicit=True
    )
    _check(results[:2], num_dp=2, num_pp=1)
    _check(results[2:], num_dp=2, num_pp=1)


@pytest.mark.multiprocess
def test_non_finite_loss_on_one_replica_skips_the_step_everywhere(pool4):
    results = pool4.run("dp_skip_nonfinite")
    assert all(r["skipped_loss"] != r["skipped_loss"] for r in results)  # NaN on every rank


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("what", "words"),
    [
        ("mesh size", "covers 2 ranks but the world has 4; choose dp x pp = 4"),
        ("dp group of different stages", "do not hold the same stages"),
    ],
)
def test_refused_with_data_parallelism(pool4, what, words):
    messages = pool4.run("dp_refused", what=what)
    assert all(message is not None and words in message for message in messages), messages


@pytest.mark.multiprocess
def test_a_failing_replica_stops_every_rank():
    pool = _pool(4)  # its own ranks: after a failure the process group holds abandoned work
    try:
        results = pool.run("dp_failing", timeout_s=90)
    finally:
        pool.close(force=True)
    failed = results[3]  # replica 1, pipeline rank 1
    assert failed["type"] == "PipelineError"
    assert "ValueError: injected failure (data-parallel replica 1)" in failed["message"]
    for rank in (0, 1, 2):
        assert results[rank]["peer_failure"], results[rank]
        assert "data-parallel replica 1" in results[rank]["message"]
        assert results[rank]["elapsed"] < 50


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "num_virtual", "rows", "recompute", "free_between", "lookahead"),
    [
        ("1f1b", None, 12, "none", False, 0),
        ("zb-h1", None, 9, "none", False, 0),
        ("zb-h1", None, 12, "full", False, 0),
        ("interleaved-1f1b", 2, 12, "none", False, 0),
        ("zb-v", None, 12, "none", False, 0),
        # Freed whenever the rank turns to its other stage and gathered again: the whole gradients
        # accumulate across the re-gathers and are reduced once.
        ("interleaved-1f1b", 2, 12, "none", True, 0),
        ("zb-v", None, 12, "none", True, 1),
    ],
)
def test_full_sharding_equals_one_process_and_gathers_as_the_schedule_says(
    pool4, schedule, num_virtual, rows, recompute, free_between, lookahead
):
    # rows=9: replica 0 steps on 5 rows, replica 1 on 4; the sum is still the global-batch mean.
    # recompute="full": the backward's recomputed forward runs on the weights gathered for the step.
    results = pool4.run(
        "fsdp_exact", schedule=schedule, num_virtual=num_virtual, rows=rows, recompute=recompute,
        free_between=free_between, lookahead=lookahead,
    )
    for result in results:
        stages = result["num_stages"]
        assert stages == (2 if num_virtual or schedule == "zb-v" else 1)
        gathers = result["scheduled"]
        # By default one all-gather per stage per step, not per micro-batch (3); re-gathering
        # runs as many as the schedule has UNSHARD actions. One reduce-scatter per stage per step.
        assert gathers > stages if free_between else gathers == stages
        assert result["per_step"][:4] == [{"all_gather": gathers, "reduce": stages}] * 4, result["per_step"]
        assert result["gathers"] == 5 * gathers  # four checked steps and one for the bytes
        assert result["timeline"] == result["expected_timeline"] and result["timeline"]
        # The run's timeline prices every stage's gather and reduce-scatter for the simulator.
        gather, reduce_scatter = result["measured_costs"]
        assert all(seconds > 0 for seconds in gather + reduce_scatter), result["measured_costs"]
        # AdamW's two moments over this rank's halves only.
        assert result["state_numel"] == 2 * sum(local for local, _ in result["at_rest"].values())
        # Weights, gradients and AdamW state per rank as the planner counts them (1/dp of the
        # bytes), up to one row per tensor (AdamW: two moments per element).
        for measured, planned, rows in zip(result["measured"], result["planned"], (1, 1, 2), strict=True):
            assert abs(measured - planned) <= rows * result["padding"], result
    for rank in (0, 1):  # the two replicas' halves make up each weight, and each holds less
        pair = [r["at_rest"] for r in results if r["rank"] == rank]
        for name, (local, whole) in pair[0].items():
            assert local + pair[1][name][0] == whole and local < whole, name


@pytest.mark.multiprocess
def test_a_fully_sharded_checkpoint_resumes_sharded_or_plain(pool4, tmp_path):
    results = pool4.run("fsdp_checkpoint", directory=str(tmp_path / "ckpt"))
    assert sorted(r["plain"] for r in results) == [0, 1, 2, 3]
    # Gathered state dict names are the unsharded model's ("0.fc.weight", ...), no FSDP prefix.
    reference = set(build_reference(mlp(), seed=7).state_dict())
    assert set(results[0]["names"]) | set(results[1]["names"]) == reference

