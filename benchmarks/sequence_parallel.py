"""One GPT block split over tp ranks: tensor parallel against sequence parallel, time and memory.

Spawns `--tp` processes (gloo on 127.0.0.1, one torch thread each), builds the built-in
GPT's `DecoderBlock` whole, plainly tensor-parallel (`gpt_tensor_parallel_plan()`) and
sequence-parallel (`gpt_tensor_parallel_plan(sequence_parallel=True)`), and for each
prints on rank 0, as one JSON line:
- `saved_mib`: the bytes autograd keeps for backward on one rank after a forward, counted
  as pipefold's pipeline counts them (saved-tensor hooks, per storage;
  pipefold/runtime/memory.py), and `share` = that / the whole block's;
- `step_ms`: the median of forward + backward, the modes alternating round by round so
  that machine noise hits each alike;
- `boundary_mib`: what one rank would send across a stage boundary after the block.
Then it times the collectives the two modes use on the block's output size (all-reduce
against all-gather + reduce-scatter), which is what separates them on gloo.

Run:
    .venv/bin/python benchmarks/sequence_parallel.py
    .venv/bin/python benchmarks/sequence_parallel.py --d-model 512 --seq-len 256 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from pipefold.model.zoo.gpt import DecoderBlock
from pipefold.runtime import gpt_tensor_parallel_plan
from pipefold.runtime.memory import ActivationCounter

MODES = ("whole", "tensor", "sequence")


def _block(mode: str, args: argparse.Namespace, mesh: Any) -> nn.Module:
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(1)  # the same weights on every rank, as pipefold builds them
    block = DecoderBlock(args.d_model, args.num_heads, 8)
    if mode == "tensor":
        parallelize_module(block, mesh, gpt_tensor_parallel_plan())
    elif mode == "sequence":
        plan = gpt_tensor_parallel_plan(sequence_parallel=True)
        assert callable(plan)
        parallelize_module(block, mesh, plan(2, block))
    return block


def _input(mode: str, x: Tensor, rank: int, tp: int) -> Tensor:
    if mode == "sequence":  # this rank's positions
        x = x.tensor_split(tp, dim=1)[rank]
    return x.clone().requires_grad_()


def _worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=args.tp)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (args.tp,), mesh_dim_names=("tp",))
    x = torch.randn(args.rows, args.seq_len, args.d_model, generator=torch.Generator().manual_seed(0))
    blocks = {mode: _block(mode, args, mesh) for mode in MODES}
    saved: dict[str, int] = {}
    boundary: dict[str, int] = {}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds + 1):
        for mode in MODES:
            block, inputs = blocks[mode], _input(mode, x, rank, args.tp)
            counter = ActivationCounter(block.parameters())
            dist.barrier()
            start = time.perf_counter()
            with counter.counting():
                out = block(inputs)
            out.sum().backward()
            elapsed = time.perf_counter() - start
            if round_index == 0:  # warm-up round: count, do not time
                saved[mode], boundary[mode] = counter.peak, out.numel() * out.element_size()
            else:
                times[mode].append(elapsed)
    collectives = _time_collectives(args, x)
    if rank == 0:
        for mode in MODES:
            print(json.dumps({
                "mode": mode, "tp": args.tp, "d_model": args.d_model, "seq_len": args.seq_len,
                "rows": args.rows, "saved_mib": saved[mode] / 2**20,
                "share": saved[mode] / saved["whole"], "boundary_mib": boundary[mode] / 2**20,
                "step_ms": 1e3 * statistics.median(times[mode]),
            }))
        print(json.dumps({"collectives_ms": collectives}))
    dist.destroy_process_group()


def _time_collectives(args: argparse.Namespace, x: Tensor) -> dict[str, float]:
    """Medians over `rounds` of the block's output-sized collectives."""
    whole = x.clone()
    part = x.tensor_split(args.tp, dim=0)[0].contiguous() if args.rows % args.tp == 0 else None
    result: dict[str, list[float]] = {"all_reduce": [], "all_gather": [], "reduce_scatter": []}
    for _ in range(args.rounds):
        for name in result:
            dist.barrier()
            start = time.perf_counter()
            if name == "all_reduce":
                dist.all_reduce(whole)
            elif part is not None and name == "all_gather":
                dist.all_gather_into_tensor(torch.empty_like(x), part)
            elif part is not None:
                dist.reduce_scatter_tensor(torch.empty_like(part), whole)
            result[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--port", type=int, default=29591)
    args = parser.parse_args()
    if args.seq_len % args.tp or args.num_heads % args.tp:
        parser.error("--seq-len and --num-heads must divide by --tp")
    mp.spawn(_worker, args=(args, args.port), nprocs=args.tp)


if __name__ == "__main__":
    main()
