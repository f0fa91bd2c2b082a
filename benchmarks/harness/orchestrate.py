"""Start the benchmark ranks once and collect their results as they come.

The ranks are spawned processes (a fresh interpreter each, as under torchrun) that meet
over TCP on 127.0.0.1; rank 0 streams one result per configuration back through a
queue, so the caller can print each as soon as it is measured. A rank that dies stops
the others rather than leaving them blocked in gloo.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue as queue_module
import socket
from collections.abc import Callable, Sequence

from benchmarks.harness.results import BenchConfig, ConfigResult, RunOptions
from pipefold.errors import PipelineError

__all__ = ["free_port", "run_ranks"]

logger = logging.getLogger(__name__)

_POLL_S = 0.5


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_ranks(
    num_ranks: int,
    configs: Sequence[BenchConfig],
    options: RunOptions,
    on_result: Callable[[ConfigResult], None] | None = None,
    on_link: Callable[[dict[str, float]], None] | None = None,
) -> list[ConfigResult]:
    """Run `configs` in `num_ranks` spawned ranks; results in the order of `configs`.

    `on_link` receives the measured link (latency_s, bandwidth_bytes_per_s) before any result.
    """
    # The worker imports torch; the parent imports it only once ranks are started.
    from benchmarks.harness.worker import worker_main

    context = multiprocessing.get_context("spawn")
    results_queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=worker_main,
            args=(rank, num_ranks, port, list(configs), options, results_queue),
            name=f"pipefold-bench-rank{rank}",
        )
        for rank in range(num_ranks)
    ]
    for process in processes:
        process.start()
    results: list[ConfigResult] = []
    try:
        while len(results) < len(configs):
            try:
                kind, payload = results_queue.get(timeout=_POLL_S)
            except queue_module.Empty:
                failed = [
                    (rank, p.exitcode) for rank, p in enumerate(processes) if p.exitcode not in (None, 0)
                ]
                if failed:
                    rank, code = failed[0]
                    raise PipelineError(
                        f"benchmark rank {rank} exited with code {code} after {len(results)} of "
                        f"{len(configs)} configurations (its traceback is above); next was "
                        f"{configs[len(results)].key}"
                    ) from None
                if all(p.exitcode is not None for p in processes):
                    break
                continue
            if kind == "link":
                if on_link is not None:
                    on_link(payload)
                continue
            result = ConfigResult.from_json(payload)
            results.append(result)
            if on_result is not None:
                on_result(result)
        for rank, process in enumerate(processes):
            process.join(timeout=options.timeout_s)
            if process.exitcode not in (0, None):
                logger.warning(
                    "benchmark rank %d exited with code %s after delivering its results",
                    rank,
                    process.exitcode,
                )
    finally:
        for process in processes:
            if process.is_alive():
                logger.warning("stopping benchmark rank %s (pid %s)", process.name, process.pid)
                process.terminate()
                process.join(timeout=10)
    return results
