"""ZeRO-1 over the data-parallel replicas: sharded optimizer state, the same training.

(An MLP, not the attention model of other cases: its key bias gets a zero gradient, which
Adam turns into steps of +-lr from float noise, the same with or without ZeRO.)

Four ranks start once for the module and form a ("dp", "pp") = (2, 2) mesh. Each replica
steps on its rows of one global batch with `sharded_optimizer(pipe, AdamW)`; every
case checks the weights against one process running AdamW on the whole batch, and what
each rank's optimizer holds against its share. The rank-side functions live in this
module (`WorkerPool(..., cases=__name__)`).
"""

from __future__ import annotations

import pytest
import torch
from _cases import _batch, _loss_fn, mlp
from _workers import WorkerPool

from pipefold.errors import ConfigError
from pipefold.model import build_reference
from pipefold.runtime import (
    LayoutOptions,
    ParallelOptions,
    Pipeline,
    RuntimeOptions,
    load_checkpoint,
    save_checkpoint,
    sharded_optimizer,
)

ROWS = 8
LR = 0.01


@pytest.fixture(scope="module")
def pool4():
    pool = WorkerPool(4, cases=__name__)
    yield pool
    pool.close()


# -- rank side -------------------------------------------------------------------------------------


def _mesh(shape=(2, 2), names=("dp", "pp")):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _pipeline(mesh, schedule="1f1b"):
    return Pipeline(
        mlp(), loss_fn=_loss_fn("mlp"), schedule=schedule, num_microbatches=2,
        layout=LayoutOptions(seed=7), parallel=ParallelOptions(process_group=mesh),
        runtime=RuntimeOptions(timeout_s=60),
    )


def _train(pipe, optimizer, steps, first_seed=0):
    for seed in range(first_seed, first_seed + steps):
        inputs, targets = _batch("mlp", ROWS, seed=seed)
        shard = torch.arange(ROWS).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        pipe.step(inputs[shard], targets[shard])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _reference(steps):
    """One process, AdamW on the whole batch, the same steps."""
    model = build_reference(mlp(), seed=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loss_fn = _loss_fn("mlp")
    for seed in range(steps):
        inputs, targets = _batch("mlp", ROWS, seed=seed)
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(model.named_parameters())


def _assert_weights(pipe, reference):
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.detach(), reference[name].detach(), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def _state_numel(optimizer) -> int:
    local = optimizer.optim  # the replica's own optimizer, over its share
    return sum(value.numel() for state in local.state.values() for value in state.values()
               if isinstance(value, torch.Tensor) and value.dim() > 0)


def zero_exact(*, schedule, steps=3):
    pipe = _pipeline(_mesh(), schedule)
    optimizer = sharded_optimizer(pipe, torch.optim.AdamW, lr=LR)
    _train(pipe, optimizer, steps)
    _assert_weights(pipe, _reference(steps))
    return {
        "rank": pipe.rank,
        "dp_rank": pipe.data_parallel_rank,
        "state_numel": _state_numel(optimizer),
        "param_numel": sum(p.numel() for p in pipe.parameters()),
    }


def zero_checkpoint(*, directory):
    """Two steps with ZeRO, save; load into ZeRO at dp=2 x pp=2 and into AdamW on 4 pipeline
    ranks (no replicas); one more step of each equals one process's third step."""
    pipe = _pipeline(_mesh())
    optimizer = sharded_optimizer(pipe, torch.optim.AdamW, lr=LR)
    _train(pipe, optimizer, 2)
    save_checkpoint(pipe, directory, optimizer=optimizer, step=2)
    expected = _reference(3)

    again = _pipeline(_mesh())
    sharded = sharded_optimizer(again, torch.optim.AdamW, lr=LR)
    load_checkpoint(again, directory, optimizer=sharded)
    _train(again, sharded, 1, first_seed=2)
    _assert_weights(again, expected)

    plain = _pipeline(_mesh((4,), ("pp",)))
    adamw = torch.optim.AdamW(plain.parameters(), lr=LR)
    load_checkpoint(plain, directory, optimizer=adamw)
    _train(plain, adamw, 1, first_seed=2)
    _assert_weights(plain, expected)
    return {"rank": plain.rank}


def zero_async_checkpoint(*, directory, sync_directory):
    """A background save at dp=2 x pp=2 with ZeRO, while a third step changes the weights; it
    loads like a synchronous save of the same step: one more step from either equals one
    process's third step."""
    from pipefold.runtime.checkpoint_async import AsyncCheckpointer

    pipe = _pipeline(_mesh())
    optimizer = sharded_optimizer(pipe, torch.optim.AdamW, lr=LR)
    saver = AsyncCheckpointer(pipe)
    _train(pipe, optimizer, 2)
    save_checkpoint(pipe, sync_directory, optimizer=optimizer, step=2)
    saver.save(directory, optimizer=optimizer, step=2)
    _train(pipe, optimizer, 1, first_seed=2)  # in place, while the thread may still write
    saver.wait()
    expected = _reference(3)
    for source in (directory, sync_directory):
        again = _pipeline(_mesh())
        sharded = sharded_optimizer(again, torch.optim.AdamW, lr=LR)
        info = load_checkpoint(again, source, optimizer=sharded)
        assert info.step == 2
        _train(again, sharded, 1, first_seed=2)
        _assert_weights(again, expected)
    return {"rank": pipe.rank, "dp_rank": pipe.data_parallel_rank}


def zero_refused(*, what):
    pipe = _pipeline(_mesh())
    try:
        sharded_optimizer(pipe, "adamw" if what == "class" else torch.optim.AdamW, lr=LR)
    except ConfigError as error:
        return str(error)
    return None


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_sharded_adamw_trains_as_one_process_and_each_replica_holds_its_share(pool4, schedule):
    results = pool4.run("zero_exact", schedule=schedule)
    for rank in (0, 1):
        pair = [r for r in results if r["rank"] == rank]
        assert sorted(r["dp_rank"] for r in pair) == [0, 1]
        # Adam keeps two moments per weight: the pair's shares add up to them, and both hold some.
        assert sum(r["state_numel"] for r in pair) == 2 * pair[0]["param_numel"]
        assert all(0 < r["state_numel"] < 2 * r["param_numel"] for r in pair)


@pytest.mark.multiprocess
def test_a_zero_checkpoint_resumes_sharded_or_plain(pool4, tmp_path):
    results = pool4.run("zero_checkpoint", directory=str(tmp_path / "ckpt"))
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]


@pytest.mark.multiprocess
def test_an_async_save_with_replicas_loads_as_a_synchronous_one(pool4, tmp_path):
    results = pool4.run(
        "zero_async_checkpoint", directory=str(tmp_path / "async"), sync_directory=str(tmp_path / "sync")
    )
    assert sorted((r["dp_rank"], r["rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("what", "words"), [("class", "optimizer_class = 'adamw'")]
)
def test_what_zero_does_not_apply_to_is_refused(pool4, what, words):
    results = pool4.run("zero_refused", what=what)
    assert all(result is not None and words in result for result in results)
