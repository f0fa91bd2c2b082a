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

from pipefold.errors import ConfigError, PipefoldError, PipelineError
from pipefold.runtime.checkpoint import check_save_arguments, prepare_save, write_and_publish
from pipefold.runtime.checkpoint_optimizer import Optimizers

if TYPE_CHECKING:
    from pipefold.runtime.pipeline import Pipeline

__all__ = ["AsyncCheckpointer"]


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
        check_save_arguments(self.pipe, target, step, extra)
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
