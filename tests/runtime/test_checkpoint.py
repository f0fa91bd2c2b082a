"""Sharded checkpoints: resharding across partitions and process counts, exact resume, atomicity.

The 2-rank cases run on every rank of a pool started once for this module (see
_workers.py); this module is also the pool's case module, so the cases live here.
Single-process checks (loading a 2-rank checkpoint without any process group, the
error messages) run in the test process itself.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipefold.errors import CheckpointError, ConfigError, PipelineError
from pipefold.model import LayerSpec, TiedLayerSpec
from pipefold.runtime import (
    LayoutOptions,
    ParallelOptions,
    Pipeline,
    RuntimeOptions,
    load_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)

VOCAB, SEQ, DIM = 11, 5, 8


# -- the model: a tied embedding/head, attention blocks and a layer with a buffer ------------------


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, value):
        hidden, mask = value
        q, k, v = self.qkv(self.norm(hidden)).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask[:, None, :], -1e4)
        return hidden + self.out(scores.softmax(-1) @ v), mask


class RunningCenter(nn.Module):
    """Subtracts a running mean of its input: a buffer that changes every step and shapes the loss."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))

    def forward(self, value):
        hidden, mask = value
        out = hidden - self.mean
        if hidden.device.type != "meta":
            self.mean.mul_(0.9).add_(0.1 * hidden.detach().mean((0, 1)))
        return out, mask


def _embed(embedding, tokens):
    return embedding(tokens), tokens != 0


def _head(embedding, value):
    return value[0] @ embedding.weight.T


def layers(dim: int = DIM, num_blocks: int = 3) -> list:
    return (
        [TiedLayerSpec("embed", nn.Embedding, VOCAB, dim, forward_fn=_embed), LayerSpec(Attention, dim)]
        + [LayerSpec(RunningCenter, dim)]
        + [LayerSpec(Attention, dim) for _ in range(num_blocks - 1)]
        + [TiedLayerSpec("embed", nn.Embedding, VOCAB, dim, forward_fn=_head)]
    )


def loss_fn(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def batch(step: int, rows: int = 8):
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (rows, SEQ), generator=generator)
    tokens[:, 0] = 1  # every row attends to at least one key
    return tokens, torch.randint(0, VOCAB, (rows, SEQ), generator=generator)


def make(schedule="1f1b", partition="uniform", num_virtual=None, seed=7, lr=0.01, model=None):
    pipe = Pipeline(
        model or layers(),
        loss_fn=loss_fn,
        schedule=schedule,
        num_microbatches=4,
        num_virtual=num_virtual,
        layout=LayoutOptions(partition=partition, seed=seed, device="cpu"),
        runtime=RuntimeOptions(timeout_s=30),
    )
    return pipe, torch.optim.Adam(pipe.parameters(), lr=lr)


def train(pipe, optimizer, steps):
    losses = []
    for step in steps:
        losses.append(pipe.step(*batch(step)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def state_by_name(pipe, optimizer) -> dict:
    """Model entries and optimizer state keyed by global names, on the CPU."""
    result = {f"model/{name}": value.detach().clone() for name, value in pipe.state_dict().items()}
    for name, param in pipe.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            result[f"optimizer/{name}/{key}"] = value.detach().clone()
    return result


def assert_state_matches(pipe, optimizer, expected: dict) -> int:
    """Every local entry of `pipe` / `optimizer` equals the same-named entry of `expected`."""
    local = state_by_name(pipe, optimizer)
    assert local, "nothing local to compare"
    for name, value in local.items():
        torch.testing.assert_close(value, expected[name], msg=lambda m, n=name: f"{n}: {m}")
    return len(local)


# -- cases, run on every rank of the pool -------------------------------------------------------------


def _all_gather_state(local: dict) -> dict:
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def save_then_reshard(*, path, save_partition, load_schedule, load_partition, load_virtual=None) -> dict:
    """Save at 2 ranks with one partition, load at 2 ranks with another; everything equal by name."""
    pipe, optimizer = make(partition=save_partition)
    train(pipe, optimizer, range(2))
    save_checkpoint(pipe, path, optimizer=optimizer, step=2, extra={"note": "two steps"})
    full = _all_gather_state(state_by_name(pipe, optimizer))

    other, other_optimizer = make(load_schedule, load_partition, load_virtual, seed=99, lr=0.5)
    info = load_checkpoint(other, path, optimizer=other_optimizer)
    num_checked = assert_state_matches(other, other_optimizer, full)
    assert [group["lr"] for group in other_optimizer.param_groups] == [0.01]
    assert isinstance(other_optimizer.param_groups[0]["betas"], tuple)
    return {
        "full": full,
        "num_checked": num_checked,
        "step": info.step,
        "extra": info.extra,
        "partition": info.partition,
        "num_ranks": info.num_ranks,
    }


def resume(*, path, schedule, save_partition, resume_partition, num_virtual=None) -> dict:
    """Train 4 steps straight; train 2, save, rebuild with another partition, load, train 2: same losses."""
    straight, straight_optimizer = make(schedule, "uniform", num_virtual)
    expected = train(straight, straight_optimizer, range(4))

    first, first_optimizer = make(schedule, save_partition, num_virtual)
    before = train(first, first_optimizer, range(2))
    save_checkpoint(first, path, optimizer=first_optimizer, step=2)
    second, second_optimizer = make(schedule, resume_partition, num_virtual, seed=99)
    info = load_checkpoint(second, path, optimizer=second_optimizer)
    after = train(second, second_optimizer, range(info.step, 4))
    torch.testing.assert_close(before + after, expected)
    return {"losses": before + after}


def atomic(*, path) -> dict:
    """A save that fails on rank 1 mid-write leaves the previous checkpoint and no staging directory."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    target = Path(path)
    pipe, optimizer = make()
    train(pipe, optimizer, range(1))
    save_checkpoint(pipe, target, optimizer=optimizer, step=1)
    saved = _all_gather_state(state_by_name(pipe, optimizer))
    train(pipe, optimizer, range(1, 2))

    original = FileSystemWriter.write_data

    def broken(self, plan, planner):
        raise OSError("injected: disk full")

    if dist.get_rank() == 1:
        FileSystemWriter.write_data = broken
    errors = []
    try:
        for where in (target, target.parent / "never"):
            try:
                save_checkpoint(pipe, where, optimizer=optimizer, step=2)
            except PipelineError as error:
                errors.append(f"{type(error).__name__}: {error}")
    finally:
        FileSystemWriter.write_data = original
    dist.barrier()  # rank 0 cleans up after the failure; look once it has
    assert len(errors) == 2, errors
    assert all("injected: disk full" in error for error in errors), errors
    assert read_checkpoint_info(target).step == 1
    assert not (target.parent / "never").exists()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers

    fresh, fresh_optimizer = make(seed=99)
    load_checkpoint(fresh, target, optimizer=fresh_optimizer)
    assert_state_matches(fresh, fresh_optimizer, saved)
    return {"errors": errors}


def tied_written_once(*, path) -> dict:
    """DCP de-duplicates the tied embedding held by both ranks: no byte is written twice."""
    import torch.distributed as dist

    pipe, optimizer = make(partition=[2, 4])
    train(pipe, optimizer, range(1))
    # The head (layer 5, on rank 1) shares layer 0's embedding, so it is named "0.weight" there too.
    owners = [name for name, _ in pipe.named_parameters() if name.startswith(("0.", "5."))]
    save_checkpoint(pipe, path, optimizer=optimizer, step=1)
    result = {"owners": owners}
    if dist.get_rank() == 0:
        from pipefold.runtime.checkpoint_safety import SafeReader

        metadata = SafeReader(path).read_metadata()
        referenced = sum(info.length for info in metadata.storage_data.values())
        written = sum(p.stat().st_size for p in Path(path).glob("*.distcp"))
        result.update(referenced=referenced, written=written, keys=sorted(metadata.state_dict_metadata))
    return result


# -- the pool ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    from _workers import WorkerPool

    workers = WorkerPool(2, cases=__name__)  # the ranks run this module's functions
    yield workers
    workers.close()


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "load_schedule, load_partition, load_virtual",
    [("1f1b", [4, 2], None), ("interleaved-1f1b", [1, 2, 2, 1], 2)],
    ids=["other-cut", "interleaved-4-stages"],
)
def test_save_at_two_ranks_loads_into_another_partition_and_one_process(
    pool, tmp_path, load_schedule, load_partition, load_virtual
):
    path = str(tmp_path / "ckpt")
    results = pool.run(
        "save_then_reshard",
        path=path,
        save_partition=[2, 4],
        load_schedule=load_schedule,
        load_partition=load_partition,
        load_virtual=load_virtual,
    )
    full = results[0]["full"]
    assert results[0]["step"] == 2 and results[0]["extra"] == {"note": "two steps"}
    assert results[0]["partition"] == (2, 4) and results[0]["num_ranks"] == 2
    # Every entry was checked on some rank: the tied weight on both, everything else once.
    assert sum(r["num_checked"] for r in results) > len(full)
    meta = json.loads((tmp_path / "ckpt" / "pipefold.json").read_text())
    assert sorted(f"model/{name}" for name in meta["model"]) == sorted(
        k for k in full if k.startswith("model/")
    )
    assert meta["schedule"] == "1f1b" and meta["partition"] == [2, 4]
    assert "1.mean" not in meta["model"] and "2.mean" in meta["model"]

    # One process, no process group at all: the whole model from the 2-rank checkpoint.
    single, single_optimizer = make("gpipe", seed=99, lr=0.5)
    info = load_checkpoint(single, path, optimizer=single_optimizer)
    assert assert_state_matches(single, single_optimizer, full) == len(full)
    assert info.step == 2 and single_optimizer.param_groups[0]["lr"] == 0.01


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "schedule, save_partition, resume_partition, num_virtual",
    [
        ("1f1b", [2, 4], [4, 2], None),
        ("zb-h1", [3, 3], [1, 5], None),
        ("interleaved-1f1b", [1, 2, 2, 1], [2, 1, 1, 2], 2),
    ],
    ids=["1f1b", "zb-h1", "interleaved"],
)
def test_resume_continues_the_losses_of_uninterrupted_training(
    pool, tmp_path, schedule, save_partition, resume_partition, num_virtual
):
    results = pool.run(
        "resume",
        path=str(tmp_path / "ckpt"),
        schedule=schedule,
        save_partition=save_partition,
        resume_partition=resume_partition,
        num_virtual=num_virtual,
    )
    assert results[0]["losses"] == results[1]["losses"]
    assert len(results[0]["losses"]) == 4


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_failed_save_leaves_previous_checkpoint_intact(pool, tmp_path):
    results = pool.run("atomic", path=str(tmp_path / "ckpt"))
    assert all(len(r["errors"]) == 2 for r in results)


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_tied_weight_is_written_once(pool, tmp_path):
    results = pool.run("tied_written_once", path=str(tmp_path / "ckpt"))
    assert results[0]["owners"] == results[1]["owners"] == ["0.weight"]
    # The second occurrence of the tied layer has no entry of its own: it *is* "0.weight".
    assert "model/0.weight" in results[0]["keys"] and "model/5.weight" not in results[0]["keys"]
    assert results[0]["written"] == results[0]["referenced"] > 0


# -- single process: errors ----------------------------------------------------------------------------


def _saved(tmp_path, **kwargs):
    pipe, optimizer = make("gpipe", **kwargs)
    train(pipe, optimizer, range(1))
    path = tmp_path / "ckpt"
    save_checkpoint(pipe, path, optimizer=optimizer, step=1)
    return path


def test_missing_or_foreign_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(make("gpipe")[0], tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "model.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a pipefold checkpoint"):
        load_checkpoint(make("gpipe")[0], tmp_path / "foreign")
    with pytest.raises(ConfigError, match="exists and is not a pipefold checkpoint"):
        save_checkpoint(make("gpipe")[0], tmp_path / "foreign")
    assert (tmp_path / "foreign" / "model.pt").exists()


def test_interrupted_replace_names_the_complete_previous_checkpoint(tmp_path):
    path = _saved(tmp_path)
    aside = tmp_path / ".ckpt.old-0123"
    path.rename(aside)
    with pytest.raises(ConfigError, match=r"previous checkpoint is complete at .*\.ckpt\.old-0123"):
        load_checkpoint(make("gpipe")[0], path)


def test_shape_mismatch_and_missing_entry_name_the_entry(tmp_path):
    path = _saved(tmp_path)
    with pytest.raises(ConfigError, match=r"'0\.weight' has shape \(11, 8\) .* but \(11, 16\)"):
        load_checkpoint(make("gpipe", model=layers(dim=16))[0], path)
    with pytest.raises(ConfigError, match=r"no entry '5\.qkv\.weight'"):
        load_checkpoint(make("gpipe", model=layers(num_blocks=4))[0], path)
    pipe, _ = make("gpipe")
    save_checkpoint(pipe, tmp_path / "weights-only")
    with pytest.raises(ConfigError, match="holds no optimizer state"):
        load_checkpoint(pipe, tmp_path / "weights-only", optimizer=torch.optim.SGD(pipe.parameters(), lr=1))


def test_bad_save_arguments_are_refused(tmp_path):
    pipe, _ = make("gpipe")
    with pytest.raises(ConfigError, match="extra="):
        save_checkpoint(pipe, tmp_path / "a", extra={"tensor": torch.zeros(1)})
    with pytest.raises(ConfigError, match="step=-1"):
        save_checkpoint(pipe, tmp_path / "a", step=-1)
    assert not (tmp_path / "a").exists()


def _forge(path: Path, name: str, data: bytes) -> None:
    """Write `data` as the checkpoint's file `name` and its digest into pipefold.json, as an
    attacker who rewrites both would: the digests catch damage, the unpickler must hold alone."""
    from pipefold.runtime.checkpoint_verify import digest_file

    (path / name).write_bytes(data)
    meta = json.loads((path / "pipefold.json").read_text())
    meta["files"][name] = digest_file(path / name)
    (path / "pipefold.json").write_text(json.dumps(meta))


def test_metadata_pickle_may_not_name_arbitrary_objects(tmp_path):
    path = _saved(tmp_path)
    _forge(path, ".metadata", pickle.dumps(os.system))
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_checkpoint(make("gpipe")[0], path)


@pytest.mark.parametrize(
    "module",
    ["torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.metadata", "torch"],
)
def test_crafted_metadata_naming_a_dotted_global_runs_nothing(tmp_path, module):
    """The attack as reported: protocol-4 GLOBAL of (a DCP module, "os.system") on a command.
    Pickle resolves dotted names through the module's attributes, so only exact pairs are safe."""
    path = _saved(tmp_path)
    marker = tmp_path / "pwned"
    command = f"touch {marker}".encode()
    crafted = (
        b"\x80\x04c" + module.encode() + b"\nos.system\n"
        + b"C" + bytes([len(command)]) + command + b"\x85R."
    )
    _forge(path, ".metadata", crafted)
    with pytest.raises(CheckpointError, match=r"\.metadata.*names .*os\.system.*refusing to unpickle"):
        load_checkpoint(make("gpipe")[0], path)
    assert not marker.exists()
    # The same bytes through a plain unpickler would have run it: the test's payload is live.
    if module != "torch":
        pickle.loads(crafted)
        assert marker.exists()


def test_truncated_metadata_is_a_typed_error_naming_the_file(tmp_path):
    path = _saved(tmp_path)
    data = (path / ".metadata").read_bytes()
    _forge(path, ".metadata", data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"\.metadata is damaged"):
        load_checkpoint(make("gpipe")[0], path)


def test_replacing_a_checkpoint_keeps_only_the_new_one(tmp_path):
    pipe, optimizer = make("gpipe")
    for step in range(3):
        train(pipe, optimizer, range(step, step + 1))
        save_checkpoint(pipe, tmp_path / "ckpt", optimizer=optimizer, step=step + 1)
    assert read_checkpoint_info(tmp_path / "ckpt").step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    fresh, fresh_optimizer = make("gpipe", seed=3)
    load_checkpoint(fresh, tmp_path / "ckpt", optimizer=fresh_optimizer)
    assert_state_matches(fresh, fresh_optimizer, state_by_name(pipe, optimizer))


def test_a_later_save_removes_stale_staging_of_interrupted_saves_only(tmp_path):
    """Saves killed mid-way (staging) or between the renames (set aside) left directories that
    no later save removed; a later successful save into the same place removes exactly those."""
    path = _saved(tmp_path)
    stale_tmp = tmp_path / f".ckpt.tmp-{'a' * 32}"
    stale_old = tmp_path / f".ckpt.old-{'b' * 32}"
    for stale in (stale_tmp, stale_old):
        stale.mkdir()
        (stale / "__0_0.distcp").write_bytes(b"partial")
    foreign = [tmp_path / ".ckpt.tmp-mine", tmp_path / f".other.tmp-{'c' * 32}", tmp_path / "notes.txt"]
    foreign[0].mkdir()
    foreign[1].mkdir()
    foreign[2].write_text("keep")
    save_checkpoint(make("gpipe")[0], path, step=2)
    assert not stale_tmp.exists() and not stale_old.exists()
    assert all(p.exists() for p in foreign)
    assert read_checkpoint_info(path).step == 2


def _shard(path: Path) -> Path:
    return max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)


def test_every_file_has_a_digest_and_zeroed_bytes_in_a_shard_are_refused_naming_it(tmp_path):
    """Zeroed bytes inside a shard used to load silently (the losses drifted)."""
    path = _saved(tmp_path)
    files = json.loads((path / "pipefold.json").read_text())["files"]
    assert ".metadata" in files and any(name.endswith(".distcp") for name in files)
    shard = _shard(path)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    damaged = rf"{shard.name}' is damaged: its SHA-256 differs.*nothing was loaded"
    with pytest.raises(CheckpointError, match=damaged):
        load_checkpoint(make("gpipe")[0], path)


def test_a_truncated_shard_is_one_typed_error_naming_the_file_and_what_to_do(tmp_path):
    """It used to be an EOFError with an empty message and ~200 lines of tracebacks."""
    path = _saved(tmp_path)
    shard = _shard(path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=rf"{shard.name}' is truncated or grown: {len(data) // 3} bytes "
                       rf"where {len(data)} were written.*resume from another checkpoint"):
        load_checkpoint(make("gpipe")[0], path)


# -- asynchronous saves --------------------------------------------------------------------------------


def test_an_async_save_holds_the_state_of_its_step_while_training_goes_on(tmp_path):
    from pipefold.runtime.checkpoint_async import AsyncCheckpointer

    pipe, optimizer = make("gpipe")
    train(pipe, optimizer, range(1))
    expected = state_by_name(pipe, optimizer)
    saver = AsyncCheckpointer(pipe)
    saver.save(tmp_path / "ckpt", optimizer=optimizer, step=1, extra={"note": "async"})
    # The loop goes on at once, changing the weights and moments in place during the write.
    train(pipe, optimizer, range(1, 3))
    saver.wait()
    info = read_checkpoint_info(tmp_path / "ckpt")
    assert info.step == 1 and info.extra == {"note": "async"}
    fresh, fresh_optimizer = make("gpipe", seed=3)
    load_checkpoint(fresh, tmp_path / "ckpt", optimizer=fresh_optimizer)
    assert_state_matches(fresh, fresh_optimizer, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_background_write_keeps_the_previous_checkpoint_and_stops_the_next_save(tmp_path):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from pipefold.runtime.checkpoint_async import AsyncCheckpointer

    pipe, optimizer = make("gpipe")
    saver = AsyncCheckpointer(pipe)
    train(pipe, optimizer, range(1))
    saver.save(tmp_path / "ckpt", optimizer=optimizer, step=1)
    saver.wait()
    original = FileSystemWriter.write_data

    def broken(self, plan, planner):
        raise OSError("injected: disk full")

    FileSystemWriter.write_data = broken
    try:
        train(pipe, optimizer, range(1, 2))
        saver.save(tmp_path / "ckpt", optimizer=optimizer, step=2)
        # The next save first waits for the one in flight, and reports its failure.
        with pytest.raises(PipelineError, match="injected: disk full.*previous checkpoint"):
            saver.save(tmp_path / "ckpt", optimizer=optimizer, step=3)
    finally:
        FileSystemWriter.write_data = original
    assert read_checkpoint_info(tmp_path / "ckpt").step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    saver.wait()  # nothing in flight, nothing left to report


def test_a_streaming_run_resumes_between_calls_as_if_uninterrupted(tmp_path):
    """`Pipeline.train` ends drained, so a checkpoint between two calls holds everything: a fresh
    pipeline loaded from it continues with the losses and weights of the one that went on."""
    def adamw(params):
        return torch.optim.AdamW(params, lr=0.01)

    def streaming_pipe():
        return Pipeline(
            [LayerSpec(nn.Linear, 4, 4) for _ in range(3)], loss_fn=F.mse_loss, schedule="pipedream-2bw",
            num_microbatches=2, layout=LayoutOptions(seed=1), parallel=ParallelOptions(optimizer=adamw),
        )

    def optimizers(pipe):
        return [stage.stash.optimizer for stage in pipe.stages]

    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(4, 4, generator=generator), torch.randn(4, 4, generator=generator)) for _ in range(6)
    ]
    going_on = streaming_pipe()
    going_on.train(batches[:3], steps=3)
    save_checkpoint(going_on, tmp_path / "ckpt", optimizer=optimizers(going_on), step=3)
    expected = going_on.train(batches[3:], steps=3)
    resumed = streaming_pipe()
    load_checkpoint(resumed, tmp_path / "ckpt", optimizer=optimizers(resumed))
    assert resumed.train(batches[3:], steps=3) == expected
    for (name, got), (_, want) in zip(resumed.named_parameters(), going_on.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, msg=name)
