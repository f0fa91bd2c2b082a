"""Round-trip latency between two ranks on one host: gloo sockets vs shared memory.

    .venv/bin/python benchmarks/transport.py                 # sizes 4 KiB .. 1 MiB
    .venv/bin/python benchmarks/transport.py --sizes 32768 --repeats 5000

Two spawned ranks (gloo on 127.0.0.1, one torch thread each) bounce one float32 tensor
back and forth through pipefold's own `P2P`: once through the process group (what
`Pipeline(transport=TransportOptions(shared_memory=False))` and torch.distributed.pipelining
use on CPU) and once through the same-host shared-memory channel (pipefold's default on CPU). Waits go
through pipefold's `Watchdog` in both cases, exactly as in a pipeline step. Both
transports alternate in rounds so machine noise hits both alike; the table gives the
median round trip per size and the ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipefold.runtime.failure import FailureBoard, Watchdog  # noqa: E402
from pipefold.runtime.transport.comm import P2P, Collectives  # noqa: E402
from pipefold.runtime.transport.shm import layout  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _round_trips(p2p: P2P, watchdog: Watchdog, rank: int, tensor: torch.Tensor, count: int) -> float:
    """Seconds per round trip over `count` round trips (one step announced per message pair)."""
    peer = 1 - rank
    buffer = torch.empty_like(tensor)
    size = layout([tensor.numel() * tensor.element_size()])[1]
    start = time.perf_counter()
    for _ in range(count):
        p2p.begin_step({peer: size}, {peer: size}, watchdog)
        if rank == 0:
            p2p.send([tensor], peer).wait(watchdog, "ping")
            p2p.recv([buffer], peer).wait(watchdog, "pong")
        else:
            p2p.recv([buffer], peer).wait(watchdog, "ping")
            p2p.send([tensor], peer).wait(watchdog, "pong")
    return (time.perf_counter() - start) / count


def _worker(rank: int, port: int, sizes: list[int], repeats: int, rounds: int, queue: object) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    group = dist.group.WORLD
    assert group is not None
    watchdog = Watchdog(FailureBoard(None, "transport"), rank=rank, timeout_s=60, poll_completion=False)
    collectives = Collectives(group, (0, 1), torch.device("cpu"), watchdog)
    sockets = P2P(group, (0, 1), torch.device("cpu"))
    shared = P2P(group, (0, 1), torch.device("cpu"))
    shared.connect_same_host(
        collectives, rank=rank, send_peers=[1 - rank], recv_peers=[1 - rank], capacity=max(sizes) + 4096
    )
    if not shared.same_host_peers:
        raise SystemExit("no shared-memory channel could be opened on this machine")
    results: dict[str, dict[int, list[float]]] = {"gloo": {}, "shm": {}}
    for size in sizes:
        tensor = torch.randn(size // 4)
        for p2p in (sockets, shared):
            _round_trips(p2p, watchdog, rank, tensor, max(repeats // 10, 10))  # warm-up
        for _ in range(rounds):
            for name, p2p in (("gloo", sockets), ("shm", shared)):
                results[name].setdefault(size, []).append(_round_trips(p2p, watchdog, rank, tensor, repeats))
    if rank == 0:
        queue.put(results)  # type: ignore[attr-defined]
    shared.close()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 32768, 131072, 1048576], help="bytes")
    parser.add_argument("--repeats", type=int, default=500, help="round trips per timing")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timings per transport")
    args = parser.parse_args()
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_worker, args=(rank, port, args.sizes, args.repeats, args.rounds, queue))
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    results = queue.get(timeout=600)
    for process in processes:
        process.join()
    lines = [
        f"Round trip between 2 ranks on one host ({os.cpu_count()} CPUs), median of {args.rounds} x "
        f"{args.repeats} round trips, through pipefold's P2P and Watchdog:",
        "",
        "| tensor | gloo (process group) us | shared memory us | gloo / shared memory |",
        "|---|---|---|---|",
    ]
    for size in args.sizes:
        gloo = statistics.median(results["gloo"][size]) * 1e6
        shm = statistics.median(results["shm"][size]) * 1e6
        lines.append(f"| {size // 1024} KiB | {gloo:.0f} | {shm:.0f} | {gloo / shm:.1f}x |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
