"""The tied embedding and head's gradient sum after the flush, measured against the planner's price.

Spawns 2 ranks (gloo on 127.0.0.1, one torch thread each; stage-to-stage and tied messages
through shared memory), builds the built-in GPT (`gpt_layers`, tied embedding and head) as a
1F1B pipeline for each vocabulary size in `--vocab`, and times `TiedGradients.sum` (the
exchange the runtime runs after the flush: each rank sends its contribution to the other and
receives theirs, then adds) over `--steps` steps. Rank 0 prints one JSON line per vocabulary:
the table's bytes, the path the runtime took (`path`: "shared memory" where the step's
collectives go through shared memory, else "process group"), the median over steps of the sum
on the rank that reaches it last (`measured_ms`: the step's cost; `first_rank_ms` the other's,
which also waits for it), the same exchange alone outside a step through the process group
(`process_group_ms`: isend + irecv, no add) and through the owners' shared-memory exchange
(`shared_memory_ms`: copy in and add, in place), and what the planner prices for it on the `cpu`
hardware preset (`priced_ms`: the planner's `Candidate.tied_exchange_s` for the same GPT at
pp=2, 1f1b). `--chunk-bytes` sets the shared-memory exchange's chunk (an experiment).

Run:
    .venv/bin/python benchmarks/tied_exchange.py                 # vocab 128, 4096, 32768 (128 KiB to 32 MiB)
    .venv/bin/python benchmarks/tied_exchange.py --vocab 8192 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

D_MODEL, NUM_HEADS, NUM_LAYERS, SEQ_LEN, ROWS, MICROBATCHES = 256, 4, 2, 64, 8, 4


def _priced(vocab: int) -> float:
    from pipefold.plan import PlanOptions, plan
    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.hardware import load_hardware

    cpu = load_hardware("cpu")
    estimate = GptEstimate(num_layers=NUM_LAYERS, d_model=D_MODEL, num_heads=NUM_HEADS, seq_len=SEQ_LEN,
                           vocab_size=vocab, hardware=cpu)
    options = PlanOptions(num_ranks=2, global_batch=ROWS, microbatches=MICROBATCHES, schedules=("1f1b",),
                          order_search_s=0, recompute="none", hardware=cpu)
    return plan(estimate, options).choice.tied_exchange_s


def _rank(args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist

    from pipefold.model.zoo import gpt_layers, gpt_loss
    from pipefold.runtime import LayoutOptions, Pipeline
    from pipefold.runtime.processes.launch import init_process_group_from_env
    from pipefold.runtime.tied import TiedGradients

    if args.chunk_bytes is not None:  # an experiment: the owners' exchange in chunks of this size
        import pipefold.runtime.tied as tied_module

        tied_module.OWNER_CHUNK_BYTES = args.chunk_bytes  # type: ignore[misc]
    init_process_group_from_env()
    rank = dist.get_rank()
    timings: list[float] = []
    original = TiedGradients.sum

    def timed(self: TiedGradients, before: Any) -> None:
        start = time.perf_counter()
        original(self, before)
        timings.append(time.perf_counter() - start)

    TiedGradients.sum = timed  # type: ignore[method-assign]
    rows = []
    for vocab in args.vocab:
        torch.manual_seed(0)
        pipe = Pipeline(gpt_layers(vocab, D_MODEL, NUM_HEADS, NUM_LAYERS, SEQ_LEN), loss_fn=gpt_loss,
                        schedule="1f1b", num_microbatches=MICROBATCHES,
                        layout=LayoutOptions(device=torch.device("cpu"), seed=0))
        tokens = torch.randint(0, vocab, (ROWS, SEQ_LEN + 1))
        table = next(p for p in pipe.parameters() if p.dim() == 2 and p.shape[0] == vocab)
        timings.clear()
        for _ in range(args.steps):
            pipe.step(tokens[:, :-1], tokens[:, 1:])
            for param in pipe.parameters():
                param.grad = None
        # The rank that arrives last at the exchange waits only for the transfer: the time the
        # step spends on it; the other also waits for it to arrive (the step's skew).
        last = torch.tensor(timings[1:], dtype=torch.float64)  # the first step warms up
        first = last.clone()
        dist.all_reduce(last, op=dist.ReduceOp.MIN)
        dist.all_reduce(first, op=dist.ReduceOp.MAX)
        # The same exchange alone, outside a step: isend + irecv of the table's size through the
        # process group, as TiedGradients.sum sends it, with both ranks lined up by a barrier.
        bare = []
        for _ in range(args.steps):
            mine, theirs = torch.ones_like(table.detach()), torch.empty_like(table.detach())
            dist.barrier()
            start = time.perf_counter()
            works = [dist.isend(mine, 1 - rank), dist.irecv(theirs, 1 - rank)]
            for work in works:
                work.wait()
            bare.append(time.perf_counter() - start)
        path = "shared memory" if any(e is not None for e in pipe.tied.exchanges) else "process group"
        # The same again through the owners' shared-memory exchange, where the runtime has one.
        exchange = next((e for e in pipe.tied.exchanges if e is not None), None)
        alone = []
        for _ in range(args.steps if exchange is not None else 0):
            mine = torch.ones_like(table.detach())
            dist.barrier()
            start = time.perf_counter()
            exchange.sum_in_rank_order(mine, watchdog=pipe._watchdog, what="benchmark", out=mine)
            alone.append(time.perf_counter() - start)
        rows.append({"vocab": vocab, "table_bytes": table.numel() * table.element_size(), "path": path,
                     "measured_ms": 1e3 * statistics.median(last.tolist()),
                     "first_rank_ms": 1e3 * statistics.median(first.tolist()),
                     "process_group_ms": 1e3 * statistics.median(bare),
                     "shared_memory_ms": 1e3 * statistics.median(alone) if alone else None,
                     "steps": len(timings) - 1})
        del pipe
    if rank == 0:
        with open(out, "w") as file:
            json.dump(rows, file)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[128, 4096, 32768])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--chunk-bytes", type=int, default=None,
                        help="the owners' shared-memory exchange's chunk (default: the runtime's)")
    args = parser.parse_args()
    from pipefold.runtime.processes.launch import spawn

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.json")
        result = spawn(_rank, 2, (args, out))
        if not result.ok:
            sys.exit(f"benchmark failed: {result.describe()}")
        with open(out) as file:
            rows = json.load(file)
    for row in rows:
        row["priced_ms"] = 1e3 * _priced(row["vocab"])
        print(json.dumps(row))


if __name__ == "__main__":
    main()
