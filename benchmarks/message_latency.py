"""One message's latency inside a pipeline run, cut into its parts, on the `tiny` workload.

    .venv/bin/python benchmarks/message_latency.py --ranks 2 --schedules gpipe 1f1b zb-h1
    .venv/bin/python benchmarks/message_latency.py --root /tmp/base     # another checkout's runtime
    .venv/bin/python benchmarks/message_latency.py --policies spin default   # wait policies, alternated

Two (or more) ranks on one host run `Pipeline.step` with the same-host channels; the executor's
send handlers and `run`, `ShmChannel.send` and the shared-memory receive's `wait` are wrapped in
the ranks (the runtime's code is unchanged) to stamp each message with `time.perf_counter_ns`
(CLOCK_MONOTONIC on Linux: one clock for every process of the host). Messages are matched across
ranks by channel and sequence number. Per schedule it prints:

- sender: its compute event's end -> its send handler's entry (the loop between them), and the
  send itself (`ShmChannel.send`: copy in and publish);
- per receiving rank: how many receives found the message not yet there (waited); per compute
  action, the step split into compute events, waiting for the peer's publish (wait call ->
  publish), wake (publish -> the wait sees it), copy out, and this rank's sends; the
  distributions of wake, copy out, and slack (publish -> wait call, for a message already there).

The wrappers add a few clock reads per message. `--policies spin default` alternates the wait
policies step by step in the same ranks (`Watchdog.busy_yield` False or its default:
docs/decisions.md, "busy polling"); `--root` runs another checkout's runtime.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _q(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    pick = lambda q: ordered[min(int(len(ordered) * q), len(ordered) - 1)]  # noqa: E731
    return f"n={len(ordered)} p10 {pick(0.1):.1f} median {pick(0.5):.1f} p90 {pick(0.9):.1f}"


_CURRENT: list[str] = [""]
"""The send action the executor runs now (set by the wrapped send handlers)."""


def _instrument() -> dict[str, list]:  # type: ignore[type-arg]
    """Wrap the executor's send handlers and run, the channel's send and the shared-memory
    receive's wait; returns the lists the stamps go to (all ns of `perf_counter_ns`): sends
    (send action, channel, sequence, handler entry, copy start, published), receives (channel,
    sequence, consumer, wait call, seen, done, was ready at the call) and events (action,
    start, end)."""
    from pipefold.runtime import executor
    from pipefold.runtime.transport import comm, shm

    stamps: dict[str, list] = {"sends": [], "receives": [], "events": []}  # type: ignore[type-arg]
    clock = time.perf_counter_ns
    entered = [0]
    # The send's start inside the executor: a forward's outputs go through `_send_outputs`, a
    # gradient through `_send_backward`, whether the send runs as its own action or from its
    # compute's handler (then `action` is the compute: named here as its send).
    def send_name(action) -> str:  # type: ignore[no-untyped-def]
        if action.op.name.startswith("SEND"):
            return str(action)
        return f"{'SEND_F' if action.op.name == 'F' else 'SEND_B'}{action.stage}.{action.microbatch}"

    if hasattr(executor.Executor, "_send_outputs"):
        send_outputs = executor.Executor._send_outputs

        def outputs_handler(self, action, outputs, peer):  # type: ignore[no-untyped-def]
            entered[0] = clock()
            _CURRENT[0] = send_name(action)
            send_outputs(self, action, outputs, peer)

        executor.Executor._send_outputs = outputs_handler  # type: ignore[method-assign]
    else:  # a checkout whose sends are always actions of their own (`--root`)
        send_forward = executor.Executor._send_forward

        def forward_handler(self, action, *, peer):  # type: ignore[no-untyped-def]
            entered[0] = clock()
            _CURRENT[0] = send_name(action)
            send_forward(self, action, peer=peer)

        executor.Executor._send_forward = forward_handler  # type: ignore[method-assign]
    send_backward = executor.Executor._send_backward

    def backward_handler(self, action, *, peer):  # type: ignore[no-untyped-def]
        entered[0] = clock()
        _CURRENT[0] = send_name(action)
        send_backward(self, action, peer=peer)

    executor.Executor._send_backward = backward_handler  # type: ignore[method-assign]
    run = executor.Executor.run

    def timed_run(self, step, **kwargs):  # type: ignore[no-untyped-def]
        record = run(self, step, **kwargs)
        origin = record.origin
        for action, begin, end in record.event_stamps:
            stamps["events"].append((str(action), int((origin + begin) * 1e9), int((origin + end) * 1e9)))
        return record

    executor.Executor.run = timed_run  # type: ignore[method-assign]
    send = shm.ShmChannel.send

    def timed_send(self, tensors):  # type: ignore[no-untyped-def]
        start = clock()
        send(self, tensors)
        stamps["sends"].append((_CURRENT[0], self.path.name, self.sequence, entered[0], start, clock()))

    shm.ShmChannel.send = timed_send  # type: ignore[method-assign]
    wait = comm._ShmReceive.wait

    def timed_wait(self, watchdog, what):  # type: ignore[no-untyped-def]
        channel, sequence = self.channel, self.sequence
        called = clock()
        ready = channel.ready(sequence)
        if not ready:
            check = channel.ready_check(sequence)
            watchdog.wait_until(check, what=what, peer=self.peer, peer_alive=self.peer_alive,
                                block=None if channel.doorbell is None else channel.doorbell.wait)
        seen = clock()
        wait(self, watchdog, what)  # ready now: only the copy out
        stamps["receives"].append((channel.path.name, sequence, what, called, seen, clock(), ready))

    comm._ShmReceive.wait = timed_wait  # type: ignore[method-assign]
    return stamps


def _worker(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(args.root))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from benchmarks.harness.pairs import pair
    from benchmarks.harness.pipefold_side import PipefoldSide
    from benchmarks.harness.workloads import workload

    stamps = _instrument()
    rank, num_ranks = dist.get_rank(), dist.get_world_size()
    work = workload("tiny")
    inputs, targets = work.make_batch(0)
    for name in args.schedules:
        side = PipefoldSide(work, work.build_layers(0), pair(name), num_ranks=num_ranks,
                            num_microbatches=args.microbatches)
        watchdog = side.pipe._watchdog
        # Each policy's stamps and steps, its steps alternating with the others'.
        per_policy: dict[str, tuple[dict, list[float]]] = {  # type: ignore[type-arg]
            policy: ({k: [] for k in stamps}, []) for policy in args.policies
        }
        for index in range(args.warmup + args.steps):
            for policy in args.policies:
                watchdog.busy_yield = policy != "spin"
                for values in stamps.values():
                    values.clear()
                dist.barrier()
                started = time.perf_counter()
                side.pipe.step(inputs, targets)
                elapsed = time.perf_counter() - started
                if index >= args.warmup:
                    kept, steps = per_policy[policy]
                    for key, values in stamps.items():
                        kept[key].extend(values)
                    steps.append(elapsed)
        for policy, (kept, steps) in per_policy.items():
            gathered: list = [None] * num_ranks  # type: ignore[type-arg]
            dist.all_gather_object(gathered, (kept, steps))
            if rank == 0:
                _report(f"{name}, {policy}" if len(args.policies) > 1 else name, args, gathered)
        del side
    dist.barrier()
    dist.destroy_process_group()


def _report(name: str, args: argparse.Namespace, gathered: list) -> None:  # type: ignore[type-arg]
    num_ranks = len(gathered)
    published = {}
    send_us, dispatch_us = [], []
    ends: dict[tuple[int, str], list[int]] = {}
    for r, (stamps, _) in enumerate(gathered):
        for action, _, end in stamps["events"]:
            ends.setdefault((r, action), []).append(end)
    for r, (stamps, _) in enumerate(gathered):
        for action, channel, sequence, entered, start, end in stamps["sends"]:
            published[(channel, sequence)] = end
            send_us.append((end - start) / 1e3)
            # The producing compute action: SEND_F s.mb follows F s.mb, SEND_B follows B or I.
            stage_mb = action.split("_", 1)[-1][1:] if "_" in action else action[1:]
            producer = None
            for op in ("F", "B", "I"):
                if action.startswith("SEND_F") and op != "F" or action.startswith("SEND_B") and op == "F":
                    continue
                candidates = [t for t in ends.get((r, op + stage_mb), []) if t <= entered]
                if candidates:
                    producer = max(candidates)
            if producer is not None:
                dispatch_us.append((entered - producer) / 1e3)
    steps = [max(column) for column in zip(*(g[1] for g in gathered), strict=True)]
    print(f"== {name} ({num_ranks} ranks, M={args.microbatches}, {args.steps} steps; "
          f"step median {statistics.median(steps) * 1e3:.1f} ms)")
    print(f"  sender: compute end -> send handler µs: {_q(dispatch_us)}")
    print(f"  sender: send (copy in, publish) µs: {_q(send_us)}")
    steps_total = sum(steps) * 1e6
    for r, (stamps, _) in enumerate(gathered):
        wake, copy_out, slack = [], [], []
        waited = 0
        peer_us = 0.0
        for channel, sequence, _what, called, seen, done, ready in stamps["receives"]:
            copy_out.append((done - seen) / 1e3)
            sent = published.get((channel, sequence))
            if sent is None:
                continue
            if ready:
                slack.append((called - sent) / 1e3)
            else:
                waited += 1
                wake.append((seen - sent) / 1e3)
                peer_us += max(sent - called, 0) / 1e3
        actions = len(stamps["events"])
        events_us = sum(end - start for _, start, end in stamps["events"]) / 1e3
        own_sends = sum((e - s) / 1e3 for a, c, q, n, s, e in stamps["sends"])
        print(f"  rank {r}: {len(stamps['receives'])} receives, {waited} waited; {actions} compute events")
        print(f"    per action µs: step {steps_total / actions:.0f}"
              f" = compute events {events_us / actions:.0f}"
              f" + waiting for the peer's publish {peer_us / actions:.1f}"
              f" + wake {sum(wake) / actions:.1f} + copy out {sum(copy_out) / actions:.1f}"
              f" + sends {own_sends / actions:.1f} + the rest")
        print(f"    wake (publish -> wait sees it) µs: {_q(wake)}")
        print(f"    copy out µs: {_q(copy_out)}")
        print(f"    slack (publish -> wait called, message there) µs: {_q(slack)}")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/message_latency.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "zb-h1"])
    parser.add_argument("--microbatches", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="the checkout whose pipefold runs (e.g. a git archive of another commit)")
    parser.add_argument(
        "--policies", nargs="+", default=["default"], choices=["default", "spin"],
        help="wait policies alternated step by step in the same ranks: default (this checkout's), "
        "spin (a busy wait that never yields: Watchdog.busy_yield False)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    worker = ["--worker", "--root", str(args.root.resolve()), "--microbatches", str(args.microbatches),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--schedules", *args.schedules,
              "--policies", *args.policies]
    started = time.perf_counter()
    # Parent only: on a rank, this checkout first on the path would shadow `code`'s pipefold.
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness.ranks import launch_workers

    done = launch_workers(__file__, args.ranks, worker, code=args.root.resolve(), timeout=args.timeout)
    print(f"({time.perf_counter() - started:.0f} s)")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
