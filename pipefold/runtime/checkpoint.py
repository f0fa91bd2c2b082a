"""Sharded, atomic, resharding checkpoints of a `Pipeline` (and its optimizer).

    save_checkpoint(pipe, "ckpt", optimizer=opt, step=step)        # on every rank
    info = load_checkpoint(pipe, "ckpt", optimizer=opt)             # any partition, any rank count
    start = info.step
    saver = AsyncCheckpointer(pipe); saver.save("ckpt", optimizer=opt, step=step)   # in the background

Every rank writes only the tensors of its own stages, through
torch.distributed.checkpoint (DCP), keyed by the names `nn.Sequential(*layers)` gives
("model/3.weight"); optimizer state is keyed by the same parameter names
("optimizer/3.weight/exp_avg"), not by the optimizer's integer ids, which depend on
how the model was cut. So a checkpoint saved with one partition or number of ranks
loads into another ("resharding"): each rank reads the entries its own layers need.
A tensor held by several ranks (a tied embedding) is written once (DCP's de-duplication).

Design notes: docs/decisions.md, "atomic checkpoints".
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import threading
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
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from pipefold._version import __version__
from pipefold.errors import CheckpointError, ConfigError, PipefoldError, PipelineError
from pipefold.runtime.checkpoint_verify import digest_files, verify_files
from pipefold.runtime.parallel.tensor_parallel import shard_like, whole
from pipefold.runtime.parallel.zero import consolidate, is_sharded_optimizer

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

    from pipefold.runtime.pipeline import Pipeline

__all__ = ["AsyncCheckpointer", "CheckpointInfo", "save_checkpoint", "load_checkpoint", "read_checkpoint_info", "METADATA_FILE"]

METADATA_FILE = "pipefold.json"
"""pipefold's own description of a checkpoint, next to DCP's files; its presence marks one."""

FORMAT_VERSION = 1
_MODEL = "model/"
_OPTIMIZER = "optimizer/"

Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None
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
    _check_save_arguments(pipe, target, step, extra)
    # A ZeRO-sharded optimizer's state is spread over the replicas: gather it on replica 0,
    # which writes it like a plain optimizer's (docs/decisions.md, "ZeRO-1 over the replicas").
    consolidate(_as_list(optimizer))
    replicas = _replica_group(pipe)
    # Data-parallel replicas hold equal weights and optimizer states: replica 0 writes, the
    # others wait for its outcome, so no rank returns before the checkpoint is in place and
    # a failure is raised everywhere.
    if replicas is not None and dist.get_rank(replicas) != 0:
        failure = _from_rank0(None, replicas)
        if failure is not None:
            raise PipelineError(f"save_checkpoint: data-parallel replica 0 failed: {failure}")
        return target
    # Tensor-parallel ranks hold shards: all of them gather each whole tensor, tp rank 0
    # writes it (docs/decisions.md, "tensor-parallel checkpoints") and the others wait for its outcome.
    tensor_parallel = _tensor_parallel_group(pipe)
    if tensor_parallel is not None and dist.get_rank(tensor_parallel) != 0:
        _local_entries(pipe, _as_list(optimizer))  # its part of every gather; tp rank 0 writes
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
    tensors, meta, token = _prepare(pipe, optimizer, step, extra, group)
    _write_and_publish(tensors, meta, target, token, group)
    return target


def _prepare(
    pipe: Pipeline, optimizer: Optimizers, step: int | None, extra: Any, group: dist.ProcessGroup | None
) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """This rank's tensors, the checkpoint's `pipefold.json` (less the digests) and the staging
    token every rank agrees on; collective over `group`."""
    tensors, record = _local_entries(pipe, _as_list(optimizer))
    records = _all_gather(record, group)
    _agree_no_errors([r["error"] for r in records], "save_checkpoint")
    token = _from_rank0(uuid.uuid4().hex if _group_rank(group) == 0 else None, group)
    return tensors, _metadata(pipe, records, step, extra), token


def _write_and_publish(
    tensors: dict[str, Tensor], meta: dict[str, Any], target: Path, token: str, group: dist.ProcessGroup | None
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


class AsyncCheckpointer:
    """Checkpoints written in the background: `save` blocks only to copy this rank's tensors to
    host memory, then a thread writes, digests and publishes them like `save_checkpoint`.

        saver = AsyncCheckpointer(pipe)                       # every rank (collective)
        saver.save("ckpt", optimizer=opt, step=step)          # every rank; returns after the copy
        saver.wait()                                          # before exiting: the last save is in place

    The thread talks to its peers over a gloo process group of its own, so its collectives never
    interleave with the training's. A save first waits for the previous one (and raises its
    error, if it failed); a crash during a background write leaves the previous checkpoint, since
    a checkpoint is published by renaming a complete staging directory. The host copy holds the
    model and optimizer state once more in CPU memory. Pipelines without data or tensor
    parallelism (their saves coordinate replicas and shards synchronously).
    """

    def __init__(self, pipe: Pipeline) -> None:
        if pipe.data_parallel_group is not None or pipe.tensor_parallel_group is not None:
            raise ConfigError(
                "async checkpoints: this pipeline has data or tensor parallelism, whose saves are not "
                "written in the background yet; use save_checkpoint (drop --async-checkpoint)"
            )
        self.pipe = pipe
        group = pipe.process_group
        self._group: dist.ProcessGroup | None = (
            None if group is None else dist.new_group(dist.get_process_group_ranks(group), backend="gloo")
        )
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(
        self, path: str | os.PathLike[str], *, optimizer: Optimizers = None, step: int | None = None,
        extra: Any = None,
    ) -> Path:
        """Start writing a checkpoint to `path` (as `save_checkpoint`); returns once the tensors
        are copied to host memory. Call on every rank with the same arguments."""
        self.wait()
        target = Path(path)
        _check_save_arguments(self.pipe, target, step, extra)
        tensors, meta, token = _prepare(self.pipe, optimizer, step, extra, self.pipe.process_group)
        # The copy the loop waits for: later steps change the weights and moments in place.
        host = {name: tensor.to("cpu", copy=True) for name, tensor in tensors.items()}
        self._thread = threading.Thread(
            target=self._write, args=(host, meta, target, token), name="pipefold-checkpoint", daemon=True
        )
        self._thread.start()
        return target

    def _write(self, tensors: dict[str, Tensor], meta: dict[str, Any], target: Path, token: str) -> None:
        try:
            _write_and_publish(tensors, meta, target, token, self._group)
        except BaseException as error:
            self._error = error

    def wait(self) -> None:
        """Block until the save in flight (if any) is in place; raise its error if it failed."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            if isinstance(error, PipefoldError):
                raise error
            raise PipelineError(
                f"save_checkpoint (in the background): {type(error).__name__}: {error}; the previous "
                "checkpoint (if any) is intact"
            ) from error


# -- loading -------------------------------------------------------------------------------------


def load_checkpoint(
    pipe: Pipeline, path: str | os.PathLike[str], *, optimizer: Optimizers = None
) -> CheckpointInfo:
    """Load this rank's weights (and optimizer state) from the checkpoint at `path`; collective.

    Call on every rank. The checkpoint may come from any number of ranks and any
    partition of the same model: each rank reads the entries of its own layers. A
    missing entry or a different shape or dtype is a ConfigError on every rank, raised
    before anything is read. `optimizer` must hold this rank's parameters (as for
    save_checkpoint); its state and hyperparameters are replaced by the saved ones.
    """
    target = Path(path)
    meta = _read_metadata(target)
    info = _info(target, meta)
    group = pipe.process_group
    _verify(target, meta, group)
    _SafeReader(target).read_metadata()  # DCP's part must be there and clean too; a ConfigError if not
    optimizers = _as_list(optimizer)
    local = pipe.state_dict()
    plan: dict[str, Tensor] = {}
    error: str | None = None
    try:
        for name, value in local.items():
            plan[_MODEL + name] = _empty_like_entry(meta["model"], name, value, target, "")
        if optimizers:
            plan.update(_optimizer_plan(pipe, optimizers, meta, target))
    except ConfigError as problem:
        error = str(problem)
    _agree_no_errors(_all_gather(error, group), "load_checkpoint")
    _dcp_load(plan, target, group)
    pipe.load_state_dict({name: plan[_MODEL + name] for name in local})
    for item in optimizers:
        _load_optimizer(pipe, item, meta["optimizer"], plan)
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


def _optimizer_plan(
    pipe: Pipeline, optimizers: list[torch.optim.Optimizer], meta: Mapping[str, Any], target: Path
) -> dict[str, Tensor]:
    saved = meta["optimizer"]
    if saved is None:
        raise ConfigError(
            f"checkpoint {str(target)!r} holds no optimizer state; load it without optimizer=, or save "
            "with save_checkpoint(..., optimizer=...)"
        )
    names = _parameter_names(pipe)
    plan: dict[str, Tensor] = {}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = _name_of(param, names, pipe.rank)
                if name not in saved["group_of"]:
                    raise ConfigError(
                        f"checkpoint {str(target)!r} has no optimizer entry for parameter {name!r}; it was "
                        "saved with an optimizer that did not hold it"
                    )
                for key, entry in saved["state"].get(name, {}).items():
                    # Optimizer state may differ from its parameter (Adam's scalar step), so only shape is
                    # checked against the saved entry's own description; torch casts on load_state_dict.
                    plan[f"{_OPTIMIZER}{name}/{key}"] = torch.empty(
                        tuple(entry["shape"]), dtype=getattr(torch, entry["dtype"])
                    )
    return plan


def _load_optimizer(
    pipe: Pipeline, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any], plan: Mapping[str, Tensor]
) -> None:
    """Give `optimizer` the saved state in its own integer-id layout, then let torch load it."""
    names = _parameter_names(pipe)
    current = _layout(optimizer)
    state: dict[int, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    for layout, group in zip(current["param_groups"], optimizer.param_groups, strict=True):
        param_names = [_name_of(param, names, pipe.rank) for param in group["params"]]
        indices = {saved["group_of"][name] for name in param_names}
        if len(indices) > 1:
            raise ConfigError(
                f"an optimizer param group holds {param_names}, which were saved in param groups with "
                f"different hyperparameters ({sorted(indices)}); group the parameters as when saving"
            )
        restored = dict(layout)
        if indices:
            restored.update(_restore_hyperparameters(saved["param_groups"][indices.pop()], layout))
        groups.append(restored)
        for index, name, param in zip(layout["params"], param_names, group["params"], strict=True):
            entry: dict[str, Any] = {
                # A tensor-parallel parameter's state (Adam's moments) is sharded like it.
                key: shard_like(plan[f"{_OPTIMIZER}{name}/{key}"], param)
                for key in saved["state"].get(name, {})
            }
            entry.update(saved["scalars"].get(name, {}))
            if entry:
                state[index] = entry
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _restore_hyperparameters(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """Saved values in the types the live group uses (tuples for betas, tensors for tensor lr)."""
    restored: dict[str, Any] = {}
    for key, value in saved.items():
        now = current.get(key)
        if isinstance(now, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(now, Tensor):
            value = torch.tensor(value, dtype=now.dtype, device=now.device)
        restored[key] = value
    return restored


def _dcp_load(plan: dict[str, Tensor], target: Path, group: dist.ProcessGroup | None) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp_load(plan, storage_reader=_SafeReader(target), process_group=group, no_dist=group is None)
        except CheckpointException as error:
            raise _unwrap(
                error, f"load_checkpoint: reading {target}", "the model may be partly loaded"
            ) from error


class _SafeReader(FileSystemReader):
    """DCP's reader, but its `.metadata` pickle may only name DCP's metadata types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ConfigError(
                f"checkpoint {str(self.path)!r} lacks DCP's .metadata ({error}); it is incomplete"
            ) from None
        try:
            metadata: Metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        except Exception as error:  # a damaged pickle raises any of a dozen types
            raise CheckpointError(
                f"{path} is damaged ({type(error).__name__}: {error}); the checkpoint cannot be read: "
                "resume from another checkpoint or start afresh"
            ) from None
        # As DCP's own reader does: older checkpoints have no storage_meta; it carries the load id.
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Exact (module, name) pairs: a module-wide rule would let pickle's dotted names reach
# anything the module imports (("...filesystem", "os.system") resolves to os.system).
_ALLOWED_GLOBALS = frozenset(
    {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        # StorageMeta.checkpoint_id is the path the checkpoint was written to.
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "WindowsPath"),
    }
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointError(
            f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never holds; refusing to "
            "unpickle it (the file is corrupt or not from save_checkpoint)"
        )


def _check_save_arguments(pipe: Pipeline, target: Path, step: int | None, extra: Any) -> None:
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


def _as_list(optimizer: Optimizers) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    found = list(optimizer)
    for item in found:
        if not isinstance(item, torch.optim.Optimizer):
            raise ConfigError(
                f"optimizer={optimizer!r}: give a torch.optim.Optimizer, a list of them, or None "
                f"(got a {type(item).__name__} in the list)"
            )
    return found


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
        names = _parameter_names(pipe)
        for optimizer in optimizers:
            states = _state_by_parameter(optimizer)
            for group in optimizer.param_groups:
                hyper = _hyperparameters(group)
                for param in group["params"]:
                    name = _name_of(param, names, pipe.rank)
                    hyperparameters[name] = hyper
                    for key, value in states.get(param, {}).items():
                        if isinstance(value, Tensor):
                            tensors[f"{_OPTIMIZER}{name}/{key}"] = whole(value.detach())
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


def _state_by_parameter(optimizer: torch.optim.Optimizer) -> Mapping[Any, Mapping[str, Any]]:
    """The optimizer's state per parameter: its `state`, or for a ZeRO-sharded one (consolidated
    first) the whole state its `state_dict()` holds under the global parameter indices."""
    if not is_sharded_optimizer(optimizer):
        return optimizer.state
    whole_state = optimizer.state_dict()
    found: dict[Any, Mapping[str, Any]] = {}
    for group, layout in zip(optimizer.param_groups, whole_state["param_groups"], strict=True):
        for param, index in zip(group["params"], layout["params"], strict=True):
            found[param] = whole_state["state"].get(index) or {}
    return found


def _layout(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's integer-id layout of its param groups (a ZeRO-sharded one's global one,
    which its `state_dict()` gives only after a consolidation)."""
    if is_sharded_optimizer(optimizer):
        return torch.optim.Optimizer.state_dict(optimizer)
    return optimizer.state_dict()


def _parameter_names(pipe: Pipeline) -> dict[int, str]:
    return {id(param): name for name, param in pipe.named_parameters()}


def _name_of(param: Tensor, names: Mapping[int, str], rank: int) -> str:
    name = names.get(id(param))
    if name is None:
        raise ConfigError(
            f"rank {rank}: the optimizer holds a parameter of shape {tuple(param.shape)} that is not one of "
            "this rank's pipeline parameters; build it from pipe.parameters()"
        )
    return name


def _hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group without its params, as JSON (tuples become lists, 1-element tensors numbers)."""
    result: dict[str, Any] = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        elif isinstance(value, (tuple, list)):
            value = list(value)
        try:
            json.dumps(value)
        except TypeError:
            raise ConfigError(
                f"optimizer param group entry {key!r} is a {type(value).__name__}; checkpoints store "
                "hyperparameters as JSON (numbers, strings, lists of them)"
            ) from None
        result[key] = value
    return result


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
