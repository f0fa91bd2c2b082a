"""Per-rank memory of replicate, ZeRO-1 and full sharding at pp=2 and dp = 1, 2, 4.

Spawns 2 x dp processes (gloo on 127.0.0.1, one torch thread each) on a ("dp", "pp") mesh,
builds the zoo's residual MLP (`mlp_layers(width, num_layers)`) as a 1F1B pipeline over them
and, for each layout that applies, runs `--steps` AdamW steps. Rank 0 prints one JSON line per
(dp, layout) with each world rank's bytes after the last step's `pipe.step` (before
`zero_grad`):
- `weights`: what the rank's parameters hold (a full-sharded rank: its 1/dp shards);
- `grads`: what their `.grad` hold;
- `optimizer`: AdamW's state the rank keeps (ZeRO-1 and full: its share only);
- `gathered`: the whole weights a full-sharded rank holds during a step (its stages'
  parameters between the first forward and the last backward; 0 at rest);
- `gathers_per_step`: weight all-gathers per step (full sharding: one per stage);
- `step_ms`: the median step (forward, backward, gradient reduction and AdamW), and
  `pipe_step_ms` that of `pipe.step` alone, rough figures on a shared CPU host;
  `replicate-after` is replicate with every all-reduce after the schedule
  (`overlap_reduction=False`), to compare with each stage's all-reduce started after its last
  backward.

Run:
    .venv/bin/python benchmarks/full_shard.py                    # dp 1, 2, 4; width 512, 8 layers
    .venv/bin/python benchmarks/full_shard.py --dp 2 --steps 12 --layouts replicate replicate-after
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipefold.model.zoo import mlp_layers
from pipefold.runtime import LayoutOptions, ParallelOptions, Pipeline, RuntimeOptions, sharded_optimizer
from pipefold.runtime.parallel.tensor_parallel import local

LAYOUTS = ("replicate", "replicate-after", "zero1", "full")
"""replicate-after: replicated, every gradient all-reduced after the schedule (no overlap)."""
PP = 2


def _bytes(tensors: Any) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


class _Run:
    """One layout's pipeline and optimizer, stepped in turn with the others'."""

    def __init__(self, layout: str, mesh: Any, args: argparse.Namespace) -> None:
        self.layout = layout
        self.pipe = Pipeline(
            mlp_layers(args.width, args.num_layers), loss_fn=F.mse_loss, schedule="1f1b",
            num_microbatches=args.microbatches, layout=LayoutOptions(seed=1),
            parallel=ParallelOptions(
                process_group=mesh, shard="full" if layout == "full" else "replicate",
                overlap_reduction=layout != "replicate-after",
            ),
            runtime=RuntimeOptions(timeout_s=300),
        )
        self.optimizer: torch.optim.Optimizer = (
            sharded_optimizer(self.pipe, torch.optim.AdamW, lr=1e-3)
            if layout == "zero1"
            else torch.optim.AdamW(self.pipe.parameters(), lr=1e-3)
        )
        self.times: list[float] = []
        self.pipe_times: list[float] = []
        self.grads = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dist.barrier()
        start = time.perf_counter()
        self.pipe.step(x, y)
        self.pipe_times.append(time.perf_counter() - start)
        self.grads = _bytes(p.grad for p in self.pipe.parameters())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)

    def report(self) -> dict[str, Any]:
        pipe, gathered = self.pipe, 0
        steps = len(self.times)
        gathers = 0 if pipe.sharding is None else pipe.sharding.num_gathers // steps
        if pipe.sharding is not None:
            # During a step each stage's whole weights are there: the gather buffers.
            pipe.sharding.gather_all()
            gathered = _bytes(pipe.parameters())
            pipe.sharding.free_all()
        optimizer: Any = self.optimizer
        state = optimizer.optim.state if self.layout == "zero1" else optimizer.state
        return {
            "weights": _bytes(pipe.parameters()),
            "grads": self.grads,
            "optimizer": _bytes(v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
            "gathered": gathered,
            "gathers_per_step": gathers,
            "step_ms": 1e3 * statistics.median(self.times[1:] or self.times),
            "pipe_step_ms": 1e3 * statistics.median(self.pipe_times[1:] or self.pipe_times),
        }


def _worker(rank: int, world: int, dp: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dp, PP), mesh_dim_names=("dp", "pp"))
    runs = [_Run(name, mesh, args) for name in args.layouts if dp > 1 or name == "replicate"]
    generator = torch.Generator().manual_seed(0)
    rows = args.rows // dp
    for _ in range(args.steps):  # the layouts alternate step by step: host noise hits each alike
        x = torch.randn(rows, args.width, generator=generator)
        y = torch.randn(rows, args.width, generator=generator)
        for run in runs:
            run.step(x, y)
    for run in runs:
        mine = run.report()
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, mine)
        if rank == 0:
            print(json.dumps({"dp": dp, "pp": PP, "layout": run.layout, "per_rank": everyone}), flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32, help="global batch rows")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    args = parser.parse_args()
    for dp in args.dp:
        mp.spawn(_worker, args=(dp * PP, dp, args, _free_port()), nprocs=dp * PP)


if __name__ == "__main__":
    main()
