"""A pool of rank processes that stay up for a whole test module.

Importing torch and joining a process group cost seconds per process, so each
test module starts its ranks once (`WorkerPool(world_size)`) and sends them many
cases: `pool.run("exact", schedule="gpipe", ...)` calls `_cases.exact(...)` on
every rank and returns the per-rank results, or raises with the failing rank's
traceback. `WorkerPool(n, cases=__name__)` runs a test module's own rank-side functions.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import queue
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _worker(rank: int, world_size: int, init_file: str, tasks, results, cases: str = "_cases") -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(HERE))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    # The module whose functions the cases name (a test module may keep its own rank-side cases).
    module = importlib.import_module(cases)

    while True:
        task = tasks.get()
        if task is None:
            break
        name, kwargs = task
        try:
            results.put((rank, True, getattr(module, name)(**kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class WorkerPool:
    """`world_size` spawned ranks in one gloo group, reused across cases."""

    def __init__(self, world_size: int, cases: str = "_cases") -> None:
        context = multiprocessing.get_context("spawn")
        self.world_size = world_size
        self._dir = tempfile.TemporaryDirectory(prefix="pipefold-pool-")
        init_file = os.path.join(self._dir.name, "rendezvous")
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(
                target=_worker,
                args=(rank, world_size, init_file, self._tasks[rank], self._results, cases),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()

    def run(self, case: str, *, timeout_s: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run `_cases.<case>(**kwargs)` on every rank; results in rank order."""
        for tasks in self._tasks:
            tasks.put((case, kwargs))
        results: dict[int, Any] = {}
        failures = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self._results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(
                    f"{case}{kwargs}: no answer within {timeout_s}s from ranks "
                    f"{sorted(set(range(self.world_size)) - set(results))}"
                ) from None
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            raise AssertionError(f"{case}{kwargs} failed:\n" + "\n".join(failures))
        return [results[rank] for rank in range(self.world_size)]

    def run_some(self, case: str, *, ranks: list[int], timeout_s: float, **kwargs: Any) -> dict[int, Any]:
        """Run a case on every rank but wait only for `ranks` (the others may die or hang)."""
        for tasks in self._tasks:
            tasks.put((case, kwargs))
        results: dict[int, Any] = {}
        while not set(ranks) <= set(results):
            try:
                rank, ok, value = self._results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(
                    f"{case}{kwargs}: ranks {ranks} did not answer within {timeout_s}s"
                ) from None
            results[rank] = value if ok else f"error: {value}"
        return results

    def close(self, *, force: bool = False) -> None:
        if not force:
            for tasks in self._tasks:
                tasks.put(None)
            for process in self._processes:
                process.join(timeout=20)
        for process in self._processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self._dir.cleanup()
