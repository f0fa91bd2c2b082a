"""Checkpoints written in the background (`AsyncCheckpointer`): the training loop waits only for
the copy of this rank's tensors to host memory; a thread writes, digests and publishes them the
way `save_checkpoint` (checkpoint.py) does, over a gloo process group of its own.

    saver = AsyncCheckpointer(pipe); saver.save("ckpt", optimizer=opt, step=step); saver.wait()
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor

from pipefold.errors import PipefoldError, PipelineError
from pipefold.runtime.checkpoint import _from_rank0 as from_rank0
from pipefold.runtime.checkpoint import _local_entries, check_save_arguments, prepare_save, write_and_publish
from pipefold.runtime.checkpoint_optimizer import Optimizers, as_list
from pipefold.runtime.parallel.zero import consolidate

if TYPE_CHECKING:
    from pipefold.runtime.pipeline import Pipeline

__all__ = ["AsyncCheckpointer"]


class AsyncCheckpointer:
    """Checkpoints written in the background: `save` blocks only to copy this rank's tensors to
    host memory, then a thread writes, digests and publishes them like `save_checkpoint`.

        saver = AsyncCheckpointer(pipe)                       # every rank (collective)
        saver.save("ckpt", optimizer=opt, step=step)          # every rank; returns after the copy
        saver.wait()                                          # every rank, before exiting

    The thread talks to its peers over a gloo process group of its own, so its collectives never
    interleave with the training's. A save first waits for the previous one (and raises its
    error, if it failed); a crash during a background write leaves the previous checkpoint, since
    a checkpoint is published by renaming a complete staging directory. The host copy holds the
    model and optimizer state once more in CPU memory.

    With data or tensor parallelism the writers are those `save_checkpoint` has write (replica 0;
    its tensor-parallel rank 0, after the foreground gathers of whole tensors, and of a ZeRO
    optimizer's shards); the other ranks learn the outcome in `wait` (the next `save` calls it),
    which is therefore collective too.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._replicas = pipe.data_parallel_group
        self._tensor_parallel = pipe.tensor_parallel_group
        self._writes = all(
            group is None or dist.get_rank(group) == 0 for group in (self._replicas, self._tensor_parallel)
        )
        """Whether this rank writes (the others wait for a writer's outcome)."""
        group = pipe.process_group
        self._group = None if group is None else _gloo_twin(group)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._in_flight = False

    def save(
        self, path: str | os.PathLike[str], *, optimizer: Optimizers = None, step: int | None = None,
        extra: Any = None,
    ) -> Path:
        """Start writing a checkpoint to `path` (as `save_checkpoint`); returns once the tensors
        are copied to host memory. Call on every rank with the same arguments."""
        self.wait()
        target = Path(path)
        check_save_arguments(self.pipe, target, step, extra)
        # As save_checkpoint does, in the foreground: a ZeRO optimizer's state gathered on replica 0.
        consolidate(as_list(optimizer))
        self._in_flight = True
        if not self._writes:
            replica0 = self._replicas is None or dist.get_rank(self._replicas) == 0
            if self._tensor_parallel is not None and replica0:
                _local_entries(self.pipe, as_list(optimizer))  # its part of tp rank 0's gathers
            return target
        tensors, meta, token = prepare_save(self.pipe, optimizer, step, extra, self.pipe.process_group)
        # The copy the loop waits for: later steps change the weights and moments in place.
        host = {name: tensor.to("cpu", copy=True) for name, tensor in tensors.items()}
        self._thread = threading.Thread(
            target=self._write, args=(host, meta, target, token), name="pipefold-checkpoint", daemon=True
        )
        self._thread.start()
        return target

    def _write(self, tensors: dict[str, Tensor], meta: dict[str, Any], target: Path, token: str) -> None:
        try:
            write_and_publish(tensors, meta, target, token, self._group)
        except BaseException as error:
            self._error = error

    def wait(self) -> None:
        """Block until the save in flight (if any) is in place; raise its error if it failed.
        Collective with data or tensor parallelism: call it on every rank."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        in_flight, self._in_flight = self._in_flight, False
        if in_flight:
            self._share_outcome(error)
        if error is not None:
            if isinstance(error, PipefoldError):
                raise error
            raise PipelineError(
                f"save_checkpoint (in the background): {type(error).__name__}: {error}; the previous "
                "checkpoint (if any) is intact"
            ) from error

    def _share_outcome(self, error: BaseException | None) -> None:
        """Tell the ranks that do not write how the write went, as save_checkpoint does (tp group
        first, then the replicas), and raise on them if it failed."""
        replicas, tensor_parallel = self._replicas, self._tensor_parallel
        if self._writes:
            failure = None if error is None else f"{type(error).__name__}: {error}"
            for group in (tensor_parallel, replicas):
                if group is not None:
                    from_rank0(failure, group)
            return
        if replicas is not None and dist.get_rank(replicas) != 0:
            failure = from_rank0(None, replicas)
            who = "data-parallel replica 0"
        else:
            failure = from_rank0(None, tensor_parallel)
            from_rank0(failure, replicas)  # this rank is replica 0's: pass the outcome on
            who = "tensor-parallel rank 0"
        if failure is not None:
            raise PipelineError(
                f"save_checkpoint (in the background): {who} failed: {failure}; the previous checkpoint "
                "(if any) is intact"
            )


def _gloo_twin(group: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """A gloo group of `group`'s ranks for the writing thread. Every rank creates every
    pipeline's twin (torch requires all ranks to take part in creating each group), in one order."""
    mine = tuple(dist.get_process_group_ranks(group))
    world_size = dist.get_world_size()
    twin: dist.ProcessGroup | None = None
    if len(mine) == world_size:
        twin = dist.new_group(list(mine), backend="gloo")
        return twin
    every: list[Any] = [None] * world_size
    dist.all_gather_object(every, mine)
    for ranks in sorted(set(map(tuple, every))):
        created = dist.new_group(list(ranks), backend="gloo")
        if ranks == mine:
            twin = created
    return twin
