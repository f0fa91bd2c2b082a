"""Rank side of the fault-injection suite (tests/runtime/test_faults.py).

Each rank trains a small MLP for one step, saves a checkpoint, and runs a second step and
save, during which the victim rank kills (SIGKILL) or stops (SIGSTOP) itself at the chosen
point: at the first action of a kind (F, B, I, W, send, receive) for micro-batch 1 of its
program (a wrapper installed with `Executor.intercept`), in the optimizer step (a pre-step
hook), or in the middle of the checkpoint save (after its shard is written, before the
digests are gathered and the checkpoint published). The injection is this module's own code,
installed by the test's workers; nothing in pipefold reads it from a file or the environment.

Every rank writes what happened to `<case dir>/rank<r>.json`; the victim writes the time of
the fault to `fault.json` just before it signals itself.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import pipefold.runtime.checkpoint as checkpoint_module
from pipefold.errors import PipefoldError
from pipefold.model import LayerSpec
from pipefold.runtime import Pipeline, save_checkpoint
from pipefold.runtime.options import LayoutOptions, RuntimeOptions
from pipefold.schedule import Op

KINDS: dict[str, tuple[Op, ...]] = {
    "F": (Op.F,),
    "B": (Op.B,),
    "I": (Op.I,),
    "W": (Op.W,),
    "send": (Op.SEND_F, Op.SEND_B),
    "receive": (Op.RECV_F, Op.RECV_B),
}
"""The action kinds and the ops that count as each; "optimizer step" and "checkpoint save" are phases."""

NUM_MICROBATCHES = 4
ROWS = 8
DIM = 8


def layers() -> list[LayerSpec]:
    return [LayerSpec(nn.Linear, DIM, DIM) for _ in range(4)] + [LayerSpec(nn.Linear, DIM, 2)]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, DIM, generator=generator), torch.randn(ROWS, 2, generator=generator)


def victim_of(num_ranks: int) -> int:
    """The rank that fails: the last of 2, a middle one of 4 (both neighbours wait on it)."""
    return 1 if num_ranks == 2 else 2


def train_step(pipe: Pipeline, optimizer: torch.optim.Optimizer) -> None:
    inputs, targets = batch()
    pipe.step(inputs, targets)
    with pipe.phase("optimizer step"):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _fault(directory: Path, how: str, at: str) -> None:
    (directory / "fault.json").write_text(json.dumps({"time": time.time(), "at": at}))
    os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)


def _install(pipe: Pipeline, optimizer: torch.optim.Optimizer, kind: str, how: str, directory: Path) -> str:
    """Arm the fault on this rank; returns where it fires (an action, or the phase)."""
    if kind == "optimizer step":
        optimizer.register_step_pre_hook(lambda *_: _fault(directory, how, kind))
        return kind
    if kind == "checkpoint save":
        digest = checkpoint_module.digest_files

        def digest_then_fail(*args: Any, **kwargs: Any) -> Any:
            _fault(directory, how, kind)
            return digest(*args, **kwargs)

        checkpoint_module.digest_files = digest_then_fail  # type: ignore[assignment]
        return kind
    row = pipe.progress.instructions[pipe.rank]
    target = next(a for a in row if a.op in KINDS[kind] and a.microbatch == 1)

    def wrapper(action, handler):  # noqa: ANN001, ANN202
        if action != target:
            return handler

        def failing(action):  # noqa: ANN001, ANN202
            _fault(directory, how, str(target))
            handler(action)

        return failing

    pipe.executor.intercept(wrapper)
    return str(target)


def run(
    rank: int, num_ranks: int, init_file: str, directory: str, *, schedule: str, kind: str, how: str,
    timeout_s: float, job: str,
) -> None:
    """One rank of one case; writes `rank<r>.json` and exits without tearing the group down."""
    out = Path(directory)
    os.environ["PIPEFOLD_JOB"] = job  # names this case's /dev/shm files, which the test looks for
    torch.set_num_threads(1)
    record: dict[str, Any] = {"rank": rank, "started": time.time()}
    try:
        # Joining and building may be slow on a loaded host; the bound under test is set after.
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=num_ranks,
            timeout=timedelta(seconds=60),
        )
        pipe = Pipeline(
            layers(), loss_fn=F.mse_loss, schedule=schedule, num_microbatches=NUM_MICROBATCHES,
            layout=LayoutOptions(seed=0),
            # Unfused I and W, so that a zero-bubble schedule keeps both kinds of action.
            runtime=RuntimeOptions(timeout_s=60, fuse_backward=False, record_timeline=False),
        )
        record["built"] = time.time()
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.1)
        train_step(pipe, optimizer)
        record["stepped"] = time.time()
        save_checkpoint(pipe, out / "checkpoint", optimizer=optimizer, step=1)
        record["saved"] = time.time()
        # The bounds under test from here on (the first step ran with a generous one: a loaded
        # host can stall a rank for a second while the others start): the pipeline's waits, and
        # the collectives outside them (the checkpoint's), as `pipefold train` sets both.
        pipe.set_timeout(timeout_s)
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s))
        if rank == victim_of(num_ranks):
            record["at"] = _install(pipe, optimizer, kind, how, out)
        train_step(pipe, optimizer)
        save_checkpoint(pipe, out / "checkpoint", optimizer=optimizer, step=2)
        record.update(error=None)
    except PipefoldError as error:
        record.update(
            error=type(error).__name__, message=str(error), failed_rank=getattr(error, "failed_rank", None)
        )
    except Exception as error:  # reported, and failed on, by the test
        record.update(error=type(error).__name__, message=f"untyped: {error}", failed_rank=None)
    record["time"] = time.time()
    (out / f"rank{rank}.json.tmp").write_text(json.dumps(record))
    os.replace(out / f"rank{rank}.json.tmp", out / f"rank{rank}.json")
    # The group is broken (a peer is gone): tearing it down could block; the process just ends.
    os._exit(0)
