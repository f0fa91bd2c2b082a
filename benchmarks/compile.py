"""Time a pipeline step with every layer compiled (`RuntimeOptions(compile=True)`) against the
same pipeline eager, alternated in one run.

One process holds two stages (zb-v: the split backward, I and W, runs on compiled layers), so
the number is the compute's, without communication. The built-in GPT (byte vocabulary), both
pipelines with the same weights; compilation happens in warm-up steps that are not timed. The
losses of the two pipelines are compared each step (they agree within float rounding).

Run:
    .venv/bin/python benchmarks/compile.py
    .venv/bin/python benchmarks/compile.py --d-model 256 --num-layers 4 --seq-len 128 --batch 16
    .venv/bin/python benchmarks/compile.py --schedule 1f1b --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.runtime import LayoutOptions, Pipeline, RuntimeOptions


def _zero_grad(pipe: Pipeline) -> None:
    for param in pipe.parameters():
        param.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--schedule", default="zb-v")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each pipeline")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    def build(compiled: bool) -> Pipeline:
        layers = gpt_layers(256, args.d_model, args.num_heads, args.num_layers, args.seq_len)
        return Pipeline(
            layers, loss_fn=gpt_loss, schedule=args.schedule, num_microbatches=args.microbatches,
            layout=LayoutOptions(seed=0, device=args.device),
            runtime=RuntimeOptions(compile=compiled, record_timeline=False),
        )

    pipes = {"eager": build(False), "compiled": build(True)}
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=generator).to(args.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    started = time.perf_counter()
    for _ in range(args.warmup):
        for pipe in pipes.values():
            pipe.step(inputs, targets)
            _zero_grad(pipe)
    print(f"warm-up (compilation included): {time.perf_counter() - started:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in pipes}
    worst = 0.0
    for _ in range(args.steps):
        losses = {}
        for name, pipe in pipes.items():  # alternated, so machine noise hits both alike
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses[name] = pipe.step(inputs, targets)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
            _zero_grad(pipe)
        worst = max(worst, abs(losses["compiled"] - losses["eager"]))
    eager, compiled = (statistics.median(times[name]) * 1e3 for name in ("eager", "compiled"))
    print(
        f"{args.schedule}, 1 process x 2 stages, GPT d={args.d_model} layers={args.num_layers} "
        f"seq={args.seq_len} batch={args.batch}/{args.microbatches} micro-batches, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"median step: eager {eager:.1f} ms, compiled {compiled:.1f} ms, speed-up {eager / compiled:.2f}x")
    print(f"largest loss difference: {worst:.2e}")


if __name__ == "__main__":
    main()
