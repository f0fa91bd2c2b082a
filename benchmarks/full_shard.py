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
- `compute_ms`: the median of the rank's F/B/I/W time in the step's timeline, so
  `pipe_step_ms - compute_ms` is its bubble plus exposed communication (the bubble is the
  schedule's, alike in every layout); `sharding_ms` (full layouts): the time of its
  UNSHARD / REDUCE_GRAD / RESHARD actions plus the waits for gathers, from the timeline;
  `full-ahead` gathers with a look-ahead of 2 actions, `full-free` frees each stage's weights
  while the rank's other stage runs (both change something only with `--num-virtual 2`);
  `replicate-after` is replicate with every all-reduce after the schedule
  (`overlap_reduction=False`), to compare with each stage's all-reduce started after its last
  backward.
- `torch-fsdp`: the same layers under `torch.distributed.pipelining` (`PipelineStage` and
  Schedule1F1B or ScheduleGPipe for `--schedule` 1f1b or gpipe, one stage per rank), each stage
  one `fully_shard` unit over "dp" with torch's defaults; its `gathers_per_step` counts FSDP's
  all-gathers (its hooks decide when they run); `compute_ms` and `sharding_ms` are None.

Run:
    .venv/bin/python benchmarks/full_shard.py                    # dp 1, 2, 4; width 512, 8 layers
    .venv/bin/python benchmarks/full_shard.py --dp 2 --steps 12 --layouts replicate replicate-after
    .venv/bin/python benchmarks/full_shard.py --dp 2 --steps 12 --schedule interleaved-1f1b \
        --num-virtual 2 --layouts replicate zero1 full full-ahead full-free
    .venv/bin/python benchmarks/full_shard.py --dp 2 --steps 16 --layouts full torch-fsdp
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
from pipefold.schedule import Op

LAYOUTS = ("replicate", "replicate-after", "zero1", "full", "full-ahead", "full-free", "torch-fsdp")
"""replicate-after: replicated, every gradient all-reduced after the schedule (no overlap);
torch-fsdp: torch.distributed.pipelining with fully_shard stages."""
PP = 2


def _bytes(tensors: Any) -> int:
    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


class _Run:
    """One layout's pipeline and optimizer, stepped in turn with the others'."""

    def __init__(self, layout: str, mesh: Any, args: argparse.Namespace) -> None:
        self.layout = layout
        self.pipe = Pipeline(
            mlp_layers(args.width, args.num_layers), loss_fn=F.mse_loss, schedule=args.schedule,
            num_microbatches=args.microbatches, num_virtual=args.num_virtual, layout=LayoutOptions(seed=1),
            parallel=ParallelOptions(
                process_group=mesh, shard="full" if layout.startswith("full") else "replicate",
                overlap_reduction=layout != "replicate-after",
                gather_lookahead=2 if layout == "full-ahead" else 0,
                free_between_microbatches=layout == "full-free",
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
        self.compute: list[float] = []
        self.sharding_times: list[float] = []
        # The compute actions that wait for a gather: the first of each stage after its UNSHARD.
        self.after_gather: set[Any] = set()
        if self.pipe.sharding is not None:
            pending: set[int] = set()
            for action in self.pipe.sharding.schedule(self.pipe.schedule).actions[self.pipe.rank]:
                if action.op is Op.UNSHARD:
                    pending.add(action.stage)
                elif action.op.is_compute and action.stage in pending:
                    pending.discard(action.stage)
                    self.after_gather.add(action)
        self.grads = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dist.barrier()
        start = time.perf_counter()
        self.pipe.step(x, y)
        self.pipe_times.append(time.perf_counter() - start)
        timeline = self.pipe.last_timeline
        assert timeline is not None  # RuntimeOptions.record_timeline is on by default
        rank = self.pipe.rank
        events = timeline.events[rank]
        self.compute.append(sum(e.duration for e in events if e.action.op.is_compute))
        waited: set[Any] = set()
        gather_waits = 0.0
        for wait in timeline.waits[rank]:  # a gather's wait comes before a receive's for one action
            if wait.waiting_for in self.after_gather and wait.waiting_for not in waited:
                waited.add(wait.waiting_for)
                gather_waits += wait.duration
        self.sharding_times.append(
            gather_waits + sum(e.duration for e in events if e.action.op.is_sharding)
        )
        self.grads = _bytes(p.grad for p in self.pipe.parameters())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)

    def report(self) -> dict[str, Any]:
        pipe, gathered = self.pipe, 0
        steps = len(self.times)
        gathers = 0 if pipe.sharding is None else pipe.sharding.num_gathers // steps
        if pipe.sharding is not None:
            # The most whole weights held at once during a step (the gather buffers): each
            # stage's gathered bytes, measured, summed over the stages gathered together in
            # the rank's row of the schedule.
            whole: dict[int, int] = {}
            for stage in pipe.stages:
                pipe.sharding.gather(stage.index)
                whole[stage.index] = _bytes(stage.parameters)
                pipe.sharding.reshard(stage.index)
            held = 0
            for action in pipe.sharding.schedule(pipe.schedule).actions[pipe.rank]:
                if action.op is Op.UNSHARD:
                    held += whole.get(action.stage, 0)
                    gathered = max(gathered, held)
                elif action.op is Op.RESHARD:
                    held -= whole.get(action.stage, 0)
        optimizer: Any = self.optimizer
        state = optimizer.optim.state if self.layout == "zero1" else optimizer.state
        return {
            "weights": _bytes(pipe.parameters()),
            "grads": self.grads,
            "optimizer": _bytes(
                v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
            ),
            "gathered": gathered,
            "gathers_per_step": gathers,
            "step_ms": 1e3 * statistics.median(self.times[1:] or self.times),
            "pipe_step_ms": 1e3 * statistics.median(self.pipe_times[1:] or self.pipe_times),
            "compute_ms": 1e3 * statistics.median(self.compute[1:] or self.compute),
            "sharding_ms": 1e3 * statistics.median(self.sharding_times[1:] or self.sharding_times),
        }


_GATHERS = [0]
"""FSDP all-gathers this process ran (counted by `_count_fsdp_gathers`)."""


def _count_fsdp_gathers() -> None:
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as fsdp_group

    original = fsdp_group.foreach_all_gather

    def counted(*args: Any, **kwargs: Any) -> Any:
        _GATHERS[0] += 1
        return original(*args, **kwargs)

    fsdp_group.foreach_all_gather = counted


class _TorchRun:
    """The same layers as a pipefold run, under torch.distributed.pipelining with each stage one
    fully_shard unit over "dp"."""

    layout = "torch-fsdp"

    def __init__(self, mesh: Any, args: argparse.Namespace) -> None:
        from torch import nn
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        classes = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
        if args.schedule not in classes or args.num_virtual not in (None, 1):
            raise SystemExit(
                f"torch-fsdp runs {', '.join(classes)} at one stage per rank; got {args.schedule}")
        self.pp_rank = mesh.get_local_rank("pp")
        per_stage = args.num_layers // PP
        torch.manual_seed(1 + self.pp_rank)
        layers = [spec.build() for spec in mlp_layers(args.width, args.num_layers)[
            self.pp_rank * per_stage:(self.pp_rank + 1) * per_stage]]
        self.module = nn.Sequential(*layers)
        fully_shard(self.module, mesh=mesh["dp"])
        stage = PipelineStage(self.module, self.pp_rank, PP, torch.device("cpu"),
                              group=mesh["pp"].get_group())
        self.schedule = classes[args.schedule](stage, n_microbatches=args.microbatches, loss_fn=F.mse_loss)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-3)
        self.times: list[float] = []
        self.pipe_times: list[float] = []
        self.gathers: list[int] = []
        self.grads = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        dist.barrier()
        start, gathers = time.perf_counter(), _GATHERS[0]
        if self.pp_rank == 0:
            self.schedule.step(x)
        else:
            self.schedule.step(target=y, losses=[])
        self.pipe_times.append(time.perf_counter() - start)
        self.gathers.append(_GATHERS[0] - gathers)
        self.grads = _bytes(p.grad for p in self.module.parameters())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)

    def report(self) -> dict[str, Any]:
        state = self.optimizer.state
        return {
            "weights": _bytes(self.module.parameters()),
            "grads": self.grads,
            "optimizer": _bytes(
                v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
            "gathered": None,
            "gathers_per_step": statistics.median(self.gathers),
            "step_ms": 1e3 * statistics.median(self.times[1:] or self.times),
            "pipe_step_ms": 1e3 * statistics.median(self.pipe_times[1:] or self.pipe_times),
            "compute_ms": None,
            "sharding_ms": None,
        }


def _worker(rank: int, world: int, dp: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dp, PP), mesh_dim_names=("dp", "pp"))
    _count_fsdp_gathers()
    runs: list[_Run | _TorchRun] = [
        _TorchRun(mesh, args) if name == "torch-fsdp" else _Run(name, mesh, args)
        for name in args.layouts if dp > 1 or name == "replicate"
    ]
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
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--num-virtual", type=int, default=None)
    args = parser.parse_args()
    for dp in args.dp:
        mp.spawn(_worker, args=(dp * PP, dp, args, _free_port()), nprocs=dp * PP)


if __name__ == "__main__":
    main()
