"""One shared-memory message's cost in one process: this checkout's channel against another's.

    .venv/bin/python benchmarks/shm_message.py --baseline /tmp/base    # e.g. git archive <commit>

Sends a 1x8 float32 tensor through a `ShmChannel` and receives it (send, claim, read), 64
messages per step as the per-action probe's micro-batches do, timing the channel code of
this checkout and of `--baseline` alternately; prints the median µs per message of each and
the median ratio. Two more rows price a zero-copy receive on this checkout's channel: the
executor's receive as it is (a fresh buffer per message, then the copy out of the shared
page), a buffer kept per (stage, micro-batch) and handed out again when nothing else holds it
(`ReceiveBuffers`: the check, then a tensor copy out), the same buffer filled through its byte
view (the executor's receive now: one slice assignment), and handing the
consumer the shared page's view itself (no buffer, no copy). No second process, so it
measures the channel's own Python and tensor work, not a wake-up or the cache lines crossing
cores. The last rows time one check of a
waiting receiver's polling loop (a message not yet published), each checkout's as its
`_ShmReceive.wait` builds it: the latency a wake-up may add.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import timeit
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/shm_message.py", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--messages", type=int, default=64)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    relative = Path("pipefold/runtime/transport/shm.py")
    modules = {"new": _load(ROOT / relative, "shm_new")}
    if args.baseline is not None:
        modules["base"] = _load(args.baseline / relative, "shm_base")
    value, buffer = torch.randn(1, 8), torch.empty(1, 8)
    channels = {}
    for label, module in modules.items():
        token = module.new_token()
        name = module.shm_name(f"message-probe-{label}-{token:x}")
        sender = module.ShmChannel.create(module.SHM_DIR, name, 1 << 16, token)
        receiver = module.ShmChannel.open(module.SHM_DIR, name, 1 << 16, token)
        sender.unlink()
        channels[label] = (sender, receiver)

    def step(label: str) -> None:
        sender, receiver = channels[label]
        sender.begin_step(args.messages * 64)
        receiver.begin_step(args.messages * 64)
        for _ in range(args.messages):
            sender.send((value,))
            sequence, offsets, _ = receiver.claim((buffer,))
            receiver.read(sequence, (buffer,), offsets)

    def receive_allocating() -> None:
        sender, receiver = channels["new"]
        sender.begin_step(args.messages * 64)
        receiver.begin_step(args.messages * 64)
        for _ in range(args.messages):
            sender.send((value,))
            fresh = torch.empty((1, 8), dtype=torch.float32)
            sequence, offsets, _ = receiver.claim((fresh,))
            receiver.read(sequence, (fresh,), offsets)

    from pipefold.model import TensorMeta
    from pipefold.runtime.receive_buffers import ReceiveBuffers
    from pipefold.runtime.stage import as_leaves

    pool = ReceiveBuffers(1, args.messages, torch.device("cpu"))
    meta = TensorMeta.of(value)

    def receive_reused() -> None:
        sender, receiver = channels["new"]
        sender.begin_step(args.messages * 64)
        receiver.begin_step(args.messages * 64)
        for microbatch in range(args.messages):
            sender.send((value,))
            _, buffers, _ = pool.input(0, microbatch, meta)
            sequence, offsets, _ = receiver.claim(buffers)
            receiver.read(sequence, buffers, offsets)

    def receive_reused_bytes() -> None:
        # The executor's receive now: a kept buffer and its byte view, one slice assignment.
        sender, receiver = channels["new"]
        sender.begin_step(args.messages * 64)
        receiver.begin_step(args.messages * 64)
        for microbatch in range(args.messages):
            sender.send((value,))
            _, buffers, views = pool.input(0, microbatch, meta)
            sequence, offsets, _ = receiver.claim(buffers)
            receiver.read_bytes(sequence, views, offsets)

    def receive_reused_consumed() -> None:
        # As the executor's consumer does: a leaf detached from the buffer, dropped before the
        # next step's receive (so the buffer is handed out again).
        sender, receiver = channels["new"]
        sender.begin_step(args.messages * 64)
        receiver.begin_step(args.messages * 64)
        leaves = []
        for microbatch in range(args.messages):
            sender.send((value,))
            received, buffers, _ = pool.input(0, microbatch, meta)
            sequence, offsets, _ = receiver.claim(buffers)
            receiver.read(sequence, buffers, offsets)
            leaves.append(as_leaves(received)[1])
        leaves.clear()

    def receive_allocating_consumed() -> None:
        sender, receiver = channels["new"]
        sender.begin_step(args.messages * 64)
        receiver.begin_step(args.messages * 64)
        leaves = []
        for _ in range(args.messages):
            sender.send((value,))
            fresh = torch.empty((1, 8), dtype=torch.float32)
            sequence, offsets, _ = receiver.claim((fresh,))
            receiver.read(sequence, (fresh,), offsets)
            leaves.append(as_leaves(fresh)[1])
        leaves.clear()

    def receive_zero_copy() -> None:
        sender, receiver = channels["new"]
        sender.begin_step(args.messages * 64)
        receiver.begin_step(args.messages * 64)
        for _ in range(args.messages):
            sender.send((value,))
            sequence, offsets, _ = receiver.claim((buffer,))
            receiver._view(offsets[0], torch.float32, buffer.shape)  # what a zero-copy consumer reads

    runs = {label: (lambda label=label: step(label)) for label in modules}
    runs["new, receive into a fresh buffer (the executor before ReceiveBuffers)"] = receive_allocating
    runs["new, receive into a kept buffer (ReceiveBuffers: check, copy out)"] = receive_reused
    runs["new, kept buffer, copy out through its byte view"] = receive_reused_bytes
    runs["new, fresh buffer, then the consumer's leaf"] = receive_allocating_consumed
    runs["new, kept buffer, then the consumer's leaf"] = receive_reused_consumed
    runs["new, zero-copy receive (the shared page's view)"] = receive_zero_copy
    timings: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.rounds):
        for label, run in runs.items():
            best = min(timeit.repeat(run, number=20, repeat=3))
            timings[label].append(best / 20 / args.messages * 1e6)
    polls: dict[str, list[float]] = {label: [] for label in channels}
    try:
        for _ in range(args.rounds):
            for label, (_, receiver) in channels.items():
                pending = receiver.sequence + 10**9
                check = (
                    receiver.ready_check(pending)
                    if hasattr(receiver, "ready_check")
                    else (lambda receiver=receiver, pending=pending: receiver.ready(pending))
                )
                polls[label].append(min(timeit.repeat(check, number=100_000, repeat=3)) / 100_000 * 1e9)
    finally:
        for sender, receiver in channels.values():
            sender.close()
            receiver.close()
    for label, values in timings.items():
        print(f"{label}: {statistics.median(values):.2f} µs per message (send, claim, read)")
    for label, values in polls.items():
        print(f"{label}: {statistics.median(values):.0f} ns per poll check of a waiting receive")
    if "base" in polls:
        ratio = statistics.median(b / n for b, n in zip(polls["base"], polls["new"], strict=True))
        print(f"poll check, base / new: {ratio:.2f}")
    if "base" in timings:
        ratio = statistics.median(b / n for b, n in zip(timings["base"], timings["new"], strict=True))
        print(f"base / new: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
