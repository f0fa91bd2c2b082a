"""The executor's per-message work through `P2P` in one process: this checkout against another's.

    .venv/bin/python benchmarks/message_path.py --baseline /tmp/base    # e.g. git archive <commit>

One process per checkout (each imports its own pipefold), alternated for `--rounds` rounds.
Each times, per 1x8 float32 message of a 64-message step, what the executor does around a
same-host message: the sender's detach, `P2P.send` (copy in, publish), the completion check
and `release_sent` of the stage output; the receiver's `ReceiveBuffers.input`, `P2P.recv`
(claim), the transfer's `wait` (the message is there: no polling) and the consumer's leaf.
Sender and receiver are one process (one channel to itself), so it prices the Python and
tensor work per message, not a wake-up or the cache lines crossing cores
(`benchmarks/message_latency.py` stamps those in a run). Prints the median µs per message
of each part and of the whole, per checkout, and base / new.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _measure(root: str, messages: int, steps: int) -> dict[str, float]:
    sys.path.insert(0, root)
    import torch

    torch.set_num_threads(1)
    from pipefold.model import TensorMeta
    from pipefold.runtime.receive_buffers import ReceiveBuffers
    from pipefold.runtime.sent_outputs import release_sent
    from pipefold.runtime.stage import as_leaves
    from pipefold.runtime.transport import shm
    from pipefold.runtime.transport.comm import P2P

    token = shm.new_token()
    name = shm.shm_name(f"message-path-{token:x}")
    sender = shm.ShmChannel.create(shm.SHM_DIR, name, 1 << 16, token)
    receiver = shm.ShmChannel.open(shm.SHM_DIR, name, 1 << 16, token)
    sender.unlink()
    p2p = P2P(None, (0, 1), torch.device("cpu"))  # type: ignore[arg-type]
    p2p._send_channels[1] = sender
    p2p._recv_channels[1] = receiver
    weight = torch.randn(8, requires_grad=True)
    value = torch.randn(1, 8)
    meta = TensorMeta.of(value)
    pool = ReceiveBuffers(1, messages, torch.device("cpu"))
    clock = time.perf_counter
    parts: dict[str, list[float]] = {"send": [], "receive": [], "whole": []}
    for _ in range(steps):
        outputs = [(value * weight,) for _ in range(messages)]
        sender.begin_step(messages * 64)
        receiver.begin_step(messages * 64)
        send_s = receive_s = 0.0
        leaves = []
        start = clock()
        for microbatch in range(messages):
            t0 = clock()
            output = outputs[microbatch]
            tensors = tuple(t.detach() for t in output)
            transfer = p2p.send(tensors, 1)
            kept = [] if transfer.done() else [tensors]
            release_sent(output)
            t1 = clock()
            received, buffers, views = pool.input(0, microbatch, meta)
            pending = p2p.recv(buffers, 1, views)
            pending.wait(None, "F1.0")  # type: ignore[arg-type]
            p2p.after_recv()
            leaves.append(as_leaves(received)[1])
            t2 = clock()
            send_s += t1 - t0
            receive_s += t2 - t1
            del kept
        whole = clock() - start
        leaves.clear()
        parts["send"].append(send_s / messages * 1e6)
        parts["receive"].append(receive_s / messages * 1e6)
        parts["whole"].append(whole / messages * 1e6)
    sender.close()
    receiver.close()
    # The best third of the steps: the work itself, not the host's interruptions.
    return {k: statistics.median(sorted(v)[: max(1, len(v) // 3)]) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/message_path.py", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(_measure(args.measure, args.messages, args.steps)))
        return 0
    roots = {"new": ROOT}
    if args.baseline is not None:
        roots["base"] = args.baseline.resolve()
    results: dict[str, list[dict[str, float]]] = {label: [] for label in roots}
    for _ in range(args.rounds):
        for label, root in roots.items():
            done = subprocess.run(
                [sys.executable, __file__, "--measure", str(root), "--messages", str(args.messages),
                 "--steps", str(args.steps)],
                capture_output=True, text=True, check=True, cwd=root,
            )
            results[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for label, rounds in results.items():
        parts = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        print(f"{label}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + " µs per message")
    if "base" in results:
        for key in results["new"][0]:
            ratios = [b[key] / n[key] for b, n in zip(results["base"], results["new"], strict=True)]
            print(f"base / new, {key}: median {statistics.median(ratios):.2f} "
                  f"(rounds {', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
