"""Sharded, atomic, resharding checkpoints of a `Pipeline` (and its optimizer).

    save_checkpoint(pipe, "ckpt", optimizer=opt, step=step)        # on every rank
    info = load_checkpoint(pipe, "ckpt", optimizer=opt)             # any partition, any rank count
    start = info.step

Every rank writes only the tensors of its own stages, through
torch.distributed.checkpoint (DCP), keyed by the names `nn.Sequential(*layers)` gives
("model/3.weight"); optimizer state is keyed by the same parameter names
("optimizer/3.weight/exp_avg"), not by the optimizer's integer ids, which depend on
how the model was cut. So a checkpoint saved with one partition or number of ranks
loads into another ("resharding"): each rank reads the entries its own layers need.
A tensor held by several ranks (a tied embedding) is written once (DCP's de-duplication).
Beside it: checkpoint_optimizer.py names and restores optimizer state, checkpoint_safety.py
reads DCP's metadata pickle safely, checkpoint_verify.py digests the files, and
checkpoint_async.py (`AsyncCheckpointer`) writes checkpoints in the background.

Design notes: docs/decisions.md, "atomic checkpoints".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from pipefold._version import __version__
from pipefold.errors import CheckpointError, ConfigError, PipefoldError, PipelineError
from pipefold.runtime.checkpoint_optimizer import (
    OPTIMIZER_PREFIX,
    Optimizers,
    as_list,
    group_hyperparameters,
    load_optimizer,
    name_of,
    optimizer_plan,
    parameter_names,
    state_by_parameter,
)
from pipefold.runtime.checkpoint_safety import SafeReader
from pipefold.runtime.checkpoint_verify import digest_files, verify_files
from pipefold.runtime.loss_scale import check_state
from pipefold.runtime.parallel.tensor_parallel import whole
from pipefold.runtime.parallel.zero import consolidate

if TYPE_CHECKING:
    from pipefold.runtime.pipeline import Pipeline

__all__ = ["CheckpointInfo", "save_checkpoint", "load_checkpoint", "read_checkpoint_info", "METADATA_FILE"]

METADATA_FILE = "pipefold.json"
"""pipefold's own description of a checkpoint, next to DCP's files; its presence marks one."""

FORMAT_VERSION = 1
_MODEL = "model/"

JSONScalar = bool | int | float | str | None


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself (from its `pipefold.json`)."""

    path: Path
    step: int | None
    """The `step` given to save_checkpoint (None if none was)."""
    extra: Any
    """The JSON value given as `extra` (None if none was)."""
    num_ranks: int
    """Pipeline ranks that saved it."""
    partition: tuple[int, ...]
    """Layers per stage when it was saved."""
    schedule_name: str
    pipefold_version: str
    model_entries: Mapping[str, tuple[int, ...]]
    """Every parameter and buffer name, with its shape."""
    has_optimizer: bool


# -- saving --------------------------------------------------------------------------------------


def save_checkpoint(
    pipe: Pipeline,
    path: str | os.PathLike[str],
    *,
    optimizer: Optimizers = None,
    step: int | None = None,
    extra: Any = None,
) -> Path:
    """Write this pipeline's weights (and optimizer state) to the directory `path`; collective.

    Call on every rank of the pipeline (with data parallelism: of every replica; replica 0
    writes) with the same `path`, `step` and `extra` (JSON data). `optimizer` is the optimizer
    over this rank's parameters, or a list of them
    (an asynchronous schedule has one per stage: `[s.stash.optimizer for s in pipe.stages]`).
    An existing checkpoint at `path` is replaced only once the new one is complete.
    All ranks must see `path` on a shared file system. Returns `path`.
    """
    target = Path(path)
    check_save_arguments(pipe, target, step, extra)
    # A peer killed or stopped during the save is named by the ranks it leaves in a collective.
    with pipe.phase("checkpoint save"):
        return _save(pipe, target, optimizer, step, extra)


def _save(pipe: Pipeline, target: Path, optimizer: Optimizers, step: int | None, extra: Any) -> Path:
    # A ZeRO-sharded optimizer's state is spread over the replicas: gather it on replica 0,
    # which writes it like a plain optimizer's (docs/decisions.md, "ZeRO-1 over the replicas").
    consolidate(as_list(optimizer))
    replicas = _replica_group(pipe)
    # Data-parallel replicas hold equal weights and optimizer states (or, fully sharded, their
    # parts of them): replica 0 writes, the others wait for its outcome, so no rank returns before
    # the checkpoint is in place and a failure is raised everywhere.
    if replicas is not None and dist.get_rank(replicas) != 0:
        if pipe.sharding is not None:
            # Fully sharded replicas hold 1/dp of each tensor: every replica joins each gather
            # over "dp" and replica 0 writes the whole tensors, as tp rank 0 does below.
            _local_entries(pipe, as_list(optimizer))
        failure = _from_rank0(None, replicas)
        if failure is not None:
            raise PipelineError(f"save_checkpoint: data-parallel replica 0 failed: {failure}")
        return target
    # Tensor-parallel ranks hold shards: all of them gather each whole tensor, tp rank 0
    # writes it (docs/decisions.md, "tensor-parallel checkpoints") and the others wait for its outcome.
    tensor_parallel = _tensor_parallel_group(pipe)
    if tensor_parallel is not None and dist.get_rank(tensor_parallel) != 0:
        _local_entries(pipe, as_list(optimizer))  # its part of every gather; tp rank 0 writes
        failure = _from_rank0(None, tensor_parallel)
        _from_rank0(failure, replicas)  # this rank is replica 0's: pass the outcome on
        if failure is not None:
            raise PipelineError(f"save_checkpoint: tensor-parallel rank 0 failed: {failure}")
        return target
    told = [group for group in (tensor_parallel, replicas) if group is not None]
    try:
        _save_replica(pipe, target, optimizer, step, extra)
    except BaseException as error:
        for group in told:
            _from_rank0(f"{type(error).__name__}: {error}", group)
        raise
    for group in told:
        _from_rank0(None, group)
    return target


def _tensor_parallel_group(pipe: Pipeline) -> dist.ProcessGroup | None:
    """The group of this rank's tensor-parallel peers (None without tensor parallelism)."""
    return pipe.tensor_parallel_group


def _replica_group(pipe: Pipeline) -> dist.ProcessGroup | None:
    """The data-parallel group across replicas of this rank's stages (None without one)."""
    return pipe.data_parallel_group


def _save_replica(
    pipe: Pipeline, target: Path, optimizer: Optimizers, step: int | None, extra: Any
) -> Path:
    """save_checkpoint within one pipeline (one replica)."""
    group = pipe.process_group
    tensors, meta, token = prepare_save(pipe, optimizer, step, extra, group)
    write_and_publish(tensors, meta, target, token, group)
    return target


def prepare_save(
    pipe: Pipeline, optimizer: Optimizers, step: int | None, extra: Any, group: dist.ProcessGroup | None
) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """This rank's tensors, the checkpoint's `pipefold.json` (less the digests) and the staging
    token every rank agrees on; collective over `group`."""
    tensors, record = _local_entries(pipe, as_list(optimizer))
    records = _all_gather(record, group)
    _agree_no_errors([r["error"] for r in records], "save_checkpoint")
    token = _from_rank0(uuid.uuid4().hex if _group_rank(group) == 0 else None, group)
    return tensors, _metadata(pipe, records, step, extra), token


def write_and_publish(
    tensors: dict[str, Tensor], meta: dict[str, Any], target: Path, token: str,
    group: dist.ProcessGroup | None,
) -> None:
    """Write the files into a staging directory, digest them, and (rank 0) move it to `target`;
    collective over `group`. A failure anywhere leaves the previous checkpoint in place."""
    is_rank0 = _group_rank(group) == 0
    staging = target.parent / f".{target.name}.tmp-{token}"
    try:
        # DCP gathers every rank's outcome and raises on all of them alike if any failed.
        _dcp_save(tensors, staging, group)
    except BaseException as error:
        if is_rank0:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, CheckpointException):
            raise _unwrap(
                error, f"save_checkpoint: writing {target}", "the previous checkpoint (if any) is intact"
            ) from error
        raise
    # Every file's digest, each rank hashing its share in parallel (checkpoint_verify.py).
    names = sorted(p.name for p in staging.iterdir() if p.name != METADATA_FILE)
    size = 1 if group is None else dist.get_world_size(group)
    files: dict[str, Any] = {}
    for share in _all_gather(digest_files(staging, names[_group_rank(group) :: size]), group):
        files.update(share)
    failure: str | None = None
    if is_rank0:
        try:
            _write_json(staging / METADATA_FILE, {**meta, "files": files})
            _publish(staging, target, token)
        except Exception as error:
            shutil.rmtree(staging, ignore_errors=True)
            failure = f"rank 0 could not put the checkpoint in place at {target}: {error!r}"
    # Nobody returns before the checkpoint is in place: rank 0 sends None, or why it failed.
    failure = _from_rank0(failure, group)
    if failure is not None:
        raise PipelineError(f"save_checkpoint: {failure}; the previous checkpoint (if any) is intact")


# -- loading -------------------------------------------------------------------------------------


def load_checkpoint(
    pipe: Pipeline, path: str | os.PathLike[str], *, optimizer: Optimizers = None
) -> CheckpointInfo:
    """Load this rank's weights (and optimizer state) from the checkpoint at `path`; collective.

    Call on every rank. The checkpoint may come from any number of ranks and any
    partition of the same model: each rank reads the entries of its own layers. A
    missing entry or a different shape or dtype is a ConfigError on every rank, raised
    before anything is read. `optimizer` must hold this rank's parameters (as for
    save_checkpoint); its state and hyperparameters are replaced by the saved ones. An fp16
    pipeline's dynamic loss scale (scale, clean-step and skipped-step counts) continues from
    the saved one where the checkpoint has it.
    """
    target = Path(path)
    meta = _read_metadata(target)
    info = _info(target, meta)
    group = pipe.process_group
    _verify(target, meta, group)
    SafeReader(target).read_metadata()  # DCP's part must be there and clean too; a ConfigError if not
    # An fp16 run continues with the saved loss scale; a checkpoint saved in fp32 / bf16 has none,
    # and the pipeline keeps its initial scale. Checked before anything is read.
    saved_scale = meta.get("loss_scale")
    if saved_scale is not None:
        if not isinstance(saved_scale, dict):
            raise ConfigError(
                f"checkpoint {str(target)!r}: loss_scale={saved_scale!r} is not a saved loss scale"
            )
        check_state(saved_scale)
    optimizers = as_list(optimizer)
    local = pipe.state_dict()
    plan: dict[str, Tensor] = {}
    error: str | None = None
    try:
        for name, value in local.items():
            plan[_MODEL + name] = _empty_like_entry(meta["model"], name, value, target, "")
        if optimizers:
            plan.update(optimizer_plan(pipe, optimizers, meta, target))
    except ConfigError as problem:
        error = str(problem)
    _agree_no_errors(_all_gather(error, group), "load_checkpoint")
    _dcp_load(plan, target, group)
    pipe.load_state_dict({name: plan[_MODEL + name] for name in local})
    for item in optimizers:
        load_optimizer(pipe, item, meta["optimizer"], plan)
    if pipe.loss_scale is not None and saved_scale is not None:
        pipe.loss_scale.load_state_dict(saved_scale)
    return info


def _verify(target: Path, meta: Mapping[str, Any], group: dist.ProcessGroup | None) -> None:
    """Check every file against the digest recorded at save (each rank its share), and raise the
    same CheckpointError on every rank if any differs. Checkpoints saved before digests were
    recorded carry none and load unchecked."""
    files = meta.get("files")
    if not isinstance(files, dict):
        return
    names = sorted(files)
    size = 1 if group is None else dist.get_world_size(group)
    mine = verify_files(target, files, names[_group_rank(group) :: size])
    problems = [problem for problem in _all_gather(mine, group) if problem]
    if problems:
        raise CheckpointError(
            f"checkpoint {str(target)!r} failed its integrity check: {'; '.join(problems)}; nothing was "
            "loaded. Restore the file from a copy, or resume from another checkpoint (an earlier run's, "
            "or the one a later --checkpoint-every save writes)"
        )


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """What the checkpoint at `path` holds, read from its JSON alone (no tensors, no process group)."""
    target = Path(path)
    return _info(target, _read_metadata(target))


def _read_metadata(target: Path) -> dict[str, Any]:
    if not target.exists():
        raise ConfigError(f"checkpoint path={str(target)!r} does not exist{_leftover_hint(target)}")
    file = target / METADATA_FILE
    if not file.is_file():
        raise ConfigError(
            f"checkpoint path={str(target)!r} is not a pipefold checkpoint (no {METADATA_FILE} in it); "
            "give a directory written by save_checkpoint (or `pipefold train`: <out>/checkpoint)"
        )
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"checkpoint {str(file)!r} cannot be read: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != "pipefold-checkpoint":
        raise ConfigError(f"checkpoint {str(file)!r} is not a pipefold checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"checkpoint {str(file)!r} has format_version={meta.get('format_version')!r}; this pipefold "
            f"reads version {FORMAT_VERSION}; load it with the pipefold that wrote it "
            f"({meta.get('pipefold_version')!r})"
        )
    return meta


def _leftover_hint(target: Path) -> str:
    parent = target.parent
    if not parent.is_dir():
        return ""
    aside = sorted(parent.glob(f".{target.name}.old-*"))
    if aside:
        return (
            f"; a save was interrupted while replacing it, and the previous checkpoint is complete at "
            f"{str(aside[-1])!r}: rename it to {str(target)!r}"
        )
    if any(parent.glob(f".{target.name}.tmp-*")):
        return "; only an unfinished save's staging directory is there (.tmp-*), which cannot be loaded"
    return ""


def _info(target: Path, meta: Mapping[str, Any]) -> CheckpointInfo:
    return CheckpointInfo(
        path=target,
        step=meta["step"],
        extra=meta["extra"],
        num_ranks=int(meta["num_ranks"]),
        partition=tuple(meta["partition"]),
        schedule_name=str(meta["schedule"]),
        pipefold_version=str(meta["pipefold_version"]),
        model_entries={name: tuple(entry["shape"]) for name, entry in meta["model"].items()},
        has_optimizer=meta["optimizer"] is not None,
    )


def _empty_like_entry(
    entries: Mapping[str, Any], name: str, local: Tensor, target: Path, kind: str
) -> Tensor:
    """A CPU tensor for DCP to fill, once the saved entry is known to fit `local`'s shape and dtype."""
    entry = entries.get(name)
    if entry is None:
        known = ", ".join(sorted(entries)[:8])
        raise ConfigError(
            f"checkpoint {str(target)!r} has no {kind}entry {name!r} (shape {tuple(local.shape)}) that this "
            f"rank's model needs; it holds {len(entries)} entries ({known}, ...); from a different model?"
        )
    shape = tuple(entry["shape"])
    if shape != tuple(local.shape):
        raise ConfigError(
            f"checkpoint entry {kind}{name!r} has shape {shape} in {str(target)!r} but "
            f"{tuple(local.shape)} in this model; build the model the checkpoint was saved from"
        )
    dtype = getattr(torch, str(entry["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"checkpoint entry {kind}{name!r} has an unknown dtype {entry['dtype']!r}")
    if kind == "" and dtype != local.dtype:
        raise ConfigError(
            f"checkpoint entry {name!r} is {dtype} in {str(target)!r} but {local.dtype} in this model; "
            "convert the model (e.g. .to(dtype)) to match before loading"
        )
    return torch.empty(shape, dtype=dtype)


def _dcp_load(plan: dict[str, Tensor], target: Path, group: dist.ProcessGroup | None) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp_load(plan, storage_reader=SafeReader(target), process_group=group, no_dist=group is None)
        except CheckpointException as error:
            raise _unwrap(
                error, f"load_checkpoint: reading {target}", "the model may be partly loaded"
            ) from error


def check_save_arguments(pipe: Pipeline, target: Path, step: int | None, extra: Any) -> None:
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ConfigError(
            f"save_checkpoint: step={step!r}; give the number of steps done (an int >= 0) or None"
        )
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"save_checkpoint: extra={extra!r} is not JSON data ({error}); pass dicts, lists, str, "
            "int, finite float, bool or None (the checkpoint stores it as JSON, never as a pickle)"
        ) from None
    if target.name in ("", ".", ".."):
        raise ConfigError(
            f"save_checkpoint: path={str(target)!r} has no directory name; give e.g. runs/x/checkpoint"
        )
    is_checkpoint = (target / METADATA_FILE).is_file()
    if target.exists() and not is_checkpoint and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(
            f"save_checkpoint: path={str(target)!r} exists and is not a pipefold checkpoint; it would be "
            "replaced, so give a new or empty directory (or an earlier checkpoint) instead"
        )


def _describe(tensor: Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _local_entries(
    pipe: Pipeline, optimizers: list[torch.optim.Optimizer]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This rank's tensors for DCP, and what it contributes to `pipefold.json` (or an error)."""
    tensors: dict[str, Tensor] = {}
    model: dict[str, dict[str, Any]] = {}
    for name, value in pipe.state_dict().items():
        tensors[_MODEL + name] = whole(value.detach())
        model[name] = _describe(value)
    record: dict[str, Any] = {"model": model, "has_optimizer": bool(optimizers), "error": None}
    state: dict[str, dict[str, dict[str, Any]]] = {}
    scalars: dict[str, dict[str, JSONScalar]] = {}
    hyperparameters: dict[str, dict[str, Any]] = {}
    try:
        names = parameter_names(pipe)
        for optimizer in optimizers:
            states = state_by_parameter(optimizer)
            for group in optimizer.param_groups:
                hyper = group_hyperparameters(group)
                for param in group["params"]:
                    name = name_of(param, names, pipe.rank)
                    hyperparameters[name] = hyper
                    for key, value in states.get(param, {}).items():
                        if isinstance(value, Tensor):
                            tensors[f"{OPTIMIZER_PREFIX}{name}/{key}"] = whole(value.detach())
                            state.setdefault(name, {})[key] = _describe(value)
                        elif isinstance(value, (bool, int, float)):
                            scalars.setdefault(name, {})[key] = value
                        else:
                            raise ConfigError(
                                f"optimizer state {name}/{key} is a {type(value).__name__}; checkpoints "
                                "hold tensors and numbers only"
                            )
    except ConfigError as error:
        record["error"] = str(error)
    record.update(state=state, scalars=scalars, hyperparameters=hyperparameters)
    return tensors, record


def _metadata(
    pipe: Pipeline, records: Sequence[dict[str, Any]], step: int | None, extra: Any
) -> dict[str, Any]:
    model: dict[str, Any] = {}
    state: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    group_of: dict[str, int] = {}
    for record in records:
        model.update(record["model"])
        state.update(record["state"])
        scalars.update(record["scalars"])
        for name, hyper in record["hyperparameters"].items():
            if hyper not in groups:
                groups.append(hyper)
            group_of[name] = groups.index(hyper)
    has_optimizer = any(record["has_optimizer"] for record in records)
    return {
        "format": "pipefold-checkpoint",
        "format_version": FORMAT_VERSION,
        "pipefold_version": __version__,
        "torch_version": torch.__version__,
        "step": step,
        "extra": extra,
        "schedule": pipe.schedule.name,
        "num_ranks": pipe.schedule.num_ranks,
        "num_stages": pipe.schedule.num_stages,
        "placement": list(pipe.schedule.placement),
        "partition": list(pipe.partition.counts),
        # fp16's dynamic loss scale: one agreement, so every rank holds the same state.
        "loss_scale": None if pipe.loss_scale is None else pipe.loss_scale.state_dict(),
        "model": dict(sorted(model.items())),
        "optimizer": (
            {
                "param_groups": groups,
                "group_of": dict(sorted(group_of.items())),
                "state": state,
                "scalars": scalars,
            }
            if has_optimizer
            else None
        ),
    }


def _dcp_save(tensors: dict[str, Tensor], staging: Path, group: dist.ProcessGroup | None) -> None:
    writer = FileSystemWriter(staging, single_file_per_rank=True, sync_files=True)
    with warnings.catch_warnings():
        # One process on purpose (no group): DCP warns that it assumes so, which is right here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_save(tensors, storage_writer=writer, process_group=group, no_dist=group is None)


def _publish(staging: Path, target: Path, token: str) -> None:
    """Move the finished `staging` to `target`, replacing an old checkpoint only once the new is in."""
    _fsync_directory(staging)
    aside = target.parent / f".{target.name}.old-{token}"
    if target.exists():
        os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        if aside.exists():
            os.rename(aside, target)
        raise
    _fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)
    remove_stale_staging(target)


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove what interrupted saves into `target` left beside it; the paths removed.

    A save killed mid-way leaves its staging directory (`.<name>.tmp-<token>`), one killed
    between its two renames the previous checkpoint set aside (`.<name>.old-<token>`, complete,
    but `target` is newer now). Called once a save has put a complete checkpoint at `target`:
    only directories named exactly so (a 32-digit hex token, as `_save_replica` draws) go,
    never anything else in the directory.
    """
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-[0-9a-f]{{32}}$")
    removed = []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return []
    for path in siblings:
        if pattern.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fsync_directory(path: Path) -> None:
    # A rename is durable only once its directory is synced (POSIX); best effort elsewhere.
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=1)
        file.flush()
        os.fsync(file.fileno())


def _unwrap(error: CheckpointException, what: str, consequence: str) -> PipefoldError:
    """DCP's CheckpointException (a BaseException, which `except Exception` misses) as our own error.

    It carries every failed rank's exception; a ConfigError on every failed rank stays one.
    """
    causes = [cause for cause, _ in error.failures.values()]
    described = "; ".join(
        f"rank {rank}: {type(cause).__name__}: {cause}" for rank, (cause, _) in sorted(error.failures.items())
    )
    kind = ConfigError if causes and all(isinstance(c, ConfigError) for c in causes) else PipelineError
    return kind(f"{what} failed ({described}); {consequence}")


# -- collectives (a no-op for one process) -------------------------------------------------------


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather(value: Any, group: dist.ProcessGroup | None) -> list[Any]:
    if group is None:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _from_rank0(value: Any, group: dist.ProcessGroup | None) -> Any:
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def _agree_no_errors(errors: Sequence[str | None], what: str) -> None:
    """Raise the same ConfigError on every rank when any rank found a problem (no rank may go on alone)."""
    found = [f"rank {rank}: {error}" for rank, error in enumerate(errors) if error is not None]
    if found:
        raise ConfigError(f"{what}: " + "; ".join(found))
