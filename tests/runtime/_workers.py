"""Rank processes that stay up for the whole test session, shared by the test modules.

Importing torch and joining a process group cost seconds per process, so the ranks of each
world size start once per session and every test module sends them its cases:
`WorkerPool(world_size)` hands out the session's ranks of that size, and
`pool.run("exact", schedule="gpipe", ...)` calls `_cases.exact(...)` on every rank and returns
the per-rank results, or raises with the failing rank's traceback. `WorkerPool(n, cases=__name__)`
runs a test module's own rank-side functions (each rank imports that module on first use).

A pool that may be broken (a case timed out, or the test injected a failure: `close(force=True)`)
is killed and the next `WorkerPool` of its size starts fresh ranks; `close()` otherwise keeps the
ranks for the next module (world sizes above 4 are stopped, so the session never holds more than
seven idle ranks). The ranks stop when the session ends.

Ranks are forked from a fork server that imported torch once (`rank_context`), as
`pipefold train` starts its ranks, instead of spawned interpreters that each import it: a start
of eight ranks costs forks, not eight torch imports. Each rank gets the test process's
environment and output (stdout, stderr) as they were when the ranks started (as under spawn),
not the server's.
"""

from __future__ import annotations

import atexit
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

from pipefold.runtime.processes.fork_server import launcher_output

HERE = Path(__file__).resolve().parent
_KEPT_WORLD_SIZES = (1, 2, 4)
RANK_PRELOAD = [
    "torch", "torch._dynamo", "torch.distributed", "pipefold.runtime", "pipefold.job.loop",
    "matplotlib.figure", "matplotlib.backends.backend_agg", "matplotlib.patches",
]
"""What the session's fork server imports once for every rank forked from it, beyond what
`pipefold train` preloads: torch._dynamo (a pipeline's first step imports it), the job's loop,
and the matplotlib modules that `pipefold train`'s rank 0 draws timeline.png with; otherwise
every rank of every run pays these imports (a second or more each on a loaded host). The fork
server imports them with its own sys.path (site-packages and the working directory): a module
that fails to import is skipped, and the rank imports it itself."""


def rank_context() -> Any:
    """The session's fork server, started now with `RANK_PRELOAD` imported, where the platform
    has one (else spawn). multiprocessing keeps one fork server per process: started here first,
    it also serves `pipefold train`'s ranks and the fault suite's (their own preload lists only
    apply to a server they start)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(RANK_PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return context


def _worker(
    rank: int, world_size: int, init_file: str, tasks, results, env: dict[str, str], output=None
) -> None:
    # The test process's output as it was when the ranks started, as a spawned rank inherits it
    # (the fork server's is the terminal's: ranks' warnings would land in the test log).
    if output is not None:
        for received, target in zip(output, (1, 2), strict=True):
            if received != target:
                os.dup2(received, target)
                os.close(received)
    # The test process's environment as it is now, not the fork server's from when it started.
    os.environ.clear()
    os.environ.update(env)
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
    while True:
        task = tasks.get()
        if task is None:
            break
        cases, name, kwargs = task
        try:
            # The module whose functions the case names (a test module may keep its own rank-side cases).
            module = importlib.import_module(cases)
            results.put((rank, True, getattr(module, name)(**kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class _Ranks:
    """`world_size` processes in one gloo group, forked from the session's fork server."""

    def __init__(self, world_size: int) -> None:
        context = rank_context()
        self.world_size = world_size
        self._dir = tempfile.TemporaryDirectory(prefix="pipefold-pool-")
        init_file = os.path.join(self._dir.name, "rendezvous")
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        self._processes = [
            context.Process(
                target=_worker,
                args=(
                    rank, world_size, init_file, self.tasks[rank], self.results, dict(os.environ),
                    launcher_output(),
                ),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()

    def stop(self, *, force: bool) -> None:
        if not force:
            for tasks in self.tasks:
                tasks.put(None)
            for process in self._processes:
                process.join(timeout=20)
        for process in self._processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self._dir.cleanup()


_SHARED: dict[int, _Ranks] = {}


def _stop_all() -> None:
    for ranks in _SHARED.values():
        ranks.stop(force=False)
    _SHARED.clear()


atexit.register(_stop_all)


class WorkerPool:
    """The session's `world_size` ranks, running this pool's `cases` module."""

    def __init__(self, world_size: int, cases: str = "_cases") -> None:
        self.world_size = world_size
        self.cases = cases
        _ = self._ranks  # start them now: a module's first case should not pay for it in its timeout

    @property
    def _ranks(self) -> _Ranks:
        # Looked up at every use: another handle may have killed the ranks (close(force=True))
        # since, and then this one starts fresh ones.
        if self.world_size not in _SHARED:
            _SHARED[self.world_size] = _Ranks(self.world_size)
        return _SHARED[self.world_size]

    def _send(self, ranks: _Ranks, case: str, kwargs: dict[str, Any]) -> None:
        for tasks in ranks.tasks:
            tasks.put((self.cases, case, kwargs))

    def _discard(self) -> None:
        # Ranks that timed out may still answer later, or wait in a collective forever: nothing
        # after this may read their queue.
        ranks = _SHARED.pop(self.world_size, None)
        if ranks is not None:
            ranks.stop(force=True)

    def run(self, case: str, *, timeout_s: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run `<cases>.<case>(**kwargs)` on every rank; results in rank order."""
        ranks = self._ranks
        self._send(ranks, case, kwargs)
        results: dict[int, Any] = {}
        failures = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = ranks.results.get(timeout=timeout_s)
            except queue.Empty:
                self._discard()
                raise TimeoutError(
                    f"{case}{kwargs}: no answer within {timeout_s}s from ranks "
                    f"{sorted(set(range(self.world_size)) - set(results) - {r for r, _ in failures})}"
                ) from None
            if ok:
                results[rank] = value
            else:
                failures.append((rank, value))
        if failures:
            raise AssertionError(
                f"{case}{kwargs} failed:\n" + "\n".join(f"rank {rank}:\n{value}" for rank, value in failures)
            )
        return [results[rank] for rank in range(self.world_size)]

    def run_some(self, case: str, *, ranks: list[int], timeout_s: float, **kwargs: Any) -> dict[int, Any]:
        """Run a case on every rank but wait only for `ranks` (the others may die or hang).

        The pool is left for `close(force=True)`: its other ranks' state is unknown.
        """
        workers = self._ranks
        self._send(workers, case, kwargs)
        results: dict[int, Any] = {}
        while not set(ranks) <= set(results):
            try:
                rank, ok, value = workers.results.get(timeout=timeout_s)
            except queue.Empty:
                self._discard()
                raise TimeoutError(
                    f"{case}{kwargs}: ranks {ranks} did not answer within {timeout_s}s"
                ) from None
            results[rank] = value if ok else f"error: {value}"
        return results

    def close(self, *, force: bool = False) -> None:
        """Give the ranks back: kept for the next module, unless `force` or an unusual world size."""
        if force or self.world_size not in _KEPT_WORLD_SIZES:
            self._discard()
