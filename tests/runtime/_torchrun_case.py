"""Run one exactness case under torchrun: `torchrun --standalone --nproc-per-node 2 _torchrun_case.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cases  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = _cases.exact(
        schedule=sys.argv[1], num_microbatches=3, model="transformer", rows=7, recompute="full"
    )
    print(f"rank {dist.get_rank()} ok losses={result['losses']}", flush=True)
    # A pipeline still alive at destroy_process_group and at exit must not abort the
    # interpreter (its waiter thread once kept a gloo Work past the group's lifetime).
    import pipefold

    kept = pipefold.Pipeline(
        [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)],
        loss_fn=torch.nn.functional.mse_loss, schedule="1f1b", num_microbatches=2,
    )
    kept.step(torch.randn(4, 4), torch.randn(4, 4))
    dist.destroy_process_group()
