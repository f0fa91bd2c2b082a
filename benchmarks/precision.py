"""fp32 against bf16 (and pure bf16) pipeline steps in the same two ranks, alternated in one run.

    .venv/bin/python benchmarks/precision.py                  # the main job's GPT, 1f1b, batch 32 / 8
    .venv/bin/python benchmarks/precision.py --d-model 64 --num-layers 2 --seq-len 32 --batch 8
    .venv/bin/python benchmarks/precision.py --precisions fp32 bf16 bf16-pure

Two spawned ranks hold one `Pipeline` per precision over the same layers and seed
(`RuntimeOptions(precision=...)`), built with the `pipefold train` defaults' model (d_model 128,
4 heads, 4 blocks, seq 128, batch 32 in 8 micro-batches). Each round runs `--steps` steps of
each pipeline in turn, so machine noise hits all alike; an AdamW step follows each, as in the
job (bf16-pure: `fp32_master_weights(AdamW)`). Prints the median step (the slower rank's wall
time, optimizer included), the median CPU time of a step summed over both ranks (less
sensitive than the wall time to other jobs on a shared host: a rank waiting for its peer
blocks, it does not spin), the bytes each rank sent per step (`pipe.last_sent_bytes`:
boundaries and their gradients) and the last losses, which agree within the 16-bit rounding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(args: argparse.Namespace, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from pipefold.model.zoo import gpt_layers, gpt_loss
    from pipefold.runtime import LayoutOptions, Pipeline, RuntimeOptions, fp32_master_weights
    from pipefold.runtime.processes.launch import init_process_group_from_env

    init_process_group_from_env()
    layers = gpt_layers(256, args.d_model, args.num_heads, args.num_layers, args.seq_len)
    pipes = {
        precision: Pipeline(
            layers, loss_fn=gpt_loss, schedule=args.schedule, num_microbatches=args.microbatches,
            layout=LayoutOptions(seed=0, device=torch.device("cpu")),
            runtime=RuntimeOptions(precision=precision, record_timeline=False),
        )
        for precision in args.precisions
    }
    # As the job: bf16-pure steps fp32 master copies of its bf16 weights.
    optimizers = {
        name: (fp32_master_weights(torch.optim.AdamW) if name == "bf16-pure" else torch.optim.AdamW)(
            pipe.parameters(), lr=1e-3
        )
        for name, pipe in pipes.items()
    }
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step(name: str) -> float:
        loss = pipes[name].step(inputs, targets)
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return loss

    for name in pipes:  # warm-up
        for _ in range(2):
            step(name)
    walls: dict[str, list[float]] = {name: [] for name in pipes}
    cpus: dict[str, list[float]] = {name: [] for name in pipes}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in pipes:
            for _ in range(args.steps):
                dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                losses[name] = step(name)
                wall = torch.tensor([time.perf_counter() - start])
                cpu = torch.tensor([time.process_time() - cpu_start])
                dist.all_reduce(wall, op=dist.ReduceOp.MAX)
                dist.all_reduce(cpu)
                walls[name].append(float(wall))
                cpus[name].append(float(cpu))
    summary = {
        name: {
            "step_s": statistics.median(walls[name]),
            "cpu_s": statistics.median(cpus[name]),
            "sent": pipes[name].last_sent_bytes,
            "loss": losses[name],
        }
        for name in pipes
    }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, summary)
    if dist.get_rank() == 0:
        out.put(gathered)
    dist.destroy_process_group()


def main() -> int:
    import multiprocessing as mp

    from pipefold.runtime.processes.launch import spawn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="steps per precision per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternations")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    out = mp.get_context("spawn").Queue()
    result = spawn(_rank, 2, (args, out), num_threads=args.threads)
    if not result.ok:
        print(result.describe(), file=sys.stderr)
        return 1
    per_rank = out.get(timeout=60)
    print(
        f"{args.schedule}, 2 ranks x {args.threads} thread(s), GPT d={args.d_model} layers={args.num_layers} "
        f"seq={args.seq_len} batch={args.batch}/{args.microbatches} micro-batches, "
        f"{args.rounds} rounds x {args.steps} steps each"
    )
    print("| precision | median step ms | median CPU ms per step | rank 0 / rank 1 sent per step (KiB) "
          "| last loss |")
    print("|---|---|---|---|---|")
    for name in args.precisions:
        sent = " / ".join(f"{per_rank[r][name]['sent'] / 1024:.0f}" for r in range(2))
        row = per_rank[0][name]
        times = f"{row['step_s'] * 1e3:.1f} | {row['cpu_s'] * 1e3:.1f}"
        print(f"| {name} | {times} | {sent} | {row['loss']:.4f} |")
    base, base_cpu = (per_rank[0][args.precisions[0]][key] for key in ("step_s", "cpu_s"))
    for name in args.precisions[1:]:
        row = per_rank[0][name]
        print(
            f"{name} / {args.precisions[0]}: step time {row['step_s'] / base:.2f}, "
            f"CPU time {row['cpu_s'] / base_cpu:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
