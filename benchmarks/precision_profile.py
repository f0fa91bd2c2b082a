"""Where a bf16 step's time goes on the CPU: the main job's GPT in one process, per op.

    .venv/bin/python benchmarks/precision_profile.py                       # fp32, bf16, bf16-pure
    .venv/bin/python benchmarks/precision_profile.py --attention-16bit     # torch's 16-bit attention core
    .venv/bin/python benchmarks/precision_profile.py --d-model 512 --num-layers 2 --top 8

The whole model (d_model 128, 4 heads, 4 blocks, seq 128: `pipefold train`'s default) runs
8 micro-batches of 4 rows forward and backward per step, one thread, as the pipeline's stages
run them: "bf16" under autocast entered per forward with the weight casts held for the step
(`pipefold.runtime.stage.held_casts`), "bf16-pure" with bf16 weights. The variants alternate
in rounds; each row gives the median thread CPU time of a step (less sensitive than the wall
time to other jobs on a shared host), then one profiled step per variant lists its most
expensive ops (self CPU time, torch.profiler). `--attention-16bit` runs the attention core in
16 bits as torch does by default (`pipefold.model.zoo.gpt` runs it in fp32 on the CPU);
`--casts-per-forward` lets autocast cast every weight again in each forward.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    import pipefold.model.zoo.gpt as gpt
    from pipefold.model import materialize
    from pipefold.runtime.held_copies import casts_kept
    from pipefold.runtime.stage import cast_floating

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rows", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--top", type=int, default=12, help="ops listed per variant")
    parser.add_argument("--attention-16bit", action="store_true")
    parser.add_argument("--casts-per-forward", action="store_true",
                        help="drop autocast's weight casts after each forward (no held_casts)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.attention_16bit:
        gpt._attention_core = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    layers = gpt.gpt_layers(256, args.d_model, args.num_heads, args.num_layers, args.seq_len)
    head = layers[-1].forward_fn
    assert head is not None

    def build(pure: bool) -> list[Any]:
        modules = materialize(layers, list(range(len(layers))), torch.device("cpu"), seed=0)
        ordered = [modules[i] for i in range(len(layers))]
        if pure:
            for module in ordered:
                module.to(torch.bfloat16)
        return ordered

    tokens = torch.randint(0, 256, (args.rows, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step(modules: list[Any], autocast: bool) -> None:
        with casts_kept() if autocast and not args.casts_per_forward else contextlib.nullcontext():
            for _ in range(args.microbatches):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    value = inputs
                    for module in modules[:-1]:
                        value = module(value)
                    logits = head(modules[-1], value)
                logits = cast_floating(logits, torch.bfloat16, torch.float32)
                gpt.gpt_loss(logits, targets).backward()

    variants = {"fp32": (build(False), False), "bf16": (build(False), True), "bf16-pure": (build(True), True)}
    for modules, autocast in variants.values():
        step(modules, autocast)
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (modules, autocast) in variants.items():
            start = time.thread_time()
            step(modules, autocast)
            cpu[name].append(time.thread_time() - start)
    attention = "16-bit (torch's default)" if args.attention_16bit else "fp32 (pipefold's GPT)"
    attention += ", weight casts per forward" if args.casts_per_forward else ", weight casts held per step"
    print(
        f"GPT d={args.d_model} layers={args.num_layers} seq={args.seq_len}, "
        f"{args.microbatches} micro-batches "
        f"of {args.rows} rows, 1 thread, attention core {attention}, {args.rounds} rounds"
    )
    base = statistics.median(cpu["fp32"])
    for name, times in cpu.items():
        median = statistics.median(times)
        print(f"{name:10s} median CPU per step {median * 1e3:7.1f} ms ({median / base:.2f}x fp32)")
    for name, (modules, autocast) in variants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(modules, autocast)
        events = prof.key_averages()
        total = sum(event.self_cpu_time_total for event in events) / 1e3
        print(f"\n{name}: profiled step {total:.1f} ms self CPU")
        print("| op | self CPU ms | calls |\n|---|---|---|")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"| {event.key} | {event.self_cpu_time_total / 1e3:.1f} | {event.count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
