"""Manual CUDA check (one GPU): every flush family, one rank, exact against a CPU reference.

    PYTHONPATH=. python3 tests/runtime/_gpu_check.py

Exercises the CUDA paths of the runtime that CPU CI cannot: device placement,
CUDA-event timing of actions, activation counting on device memory.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _cases  # noqa: E402

from pipefold.schedule import WeightUpdate, build, names  # noqa: E402

if __name__ == "__main__":
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    failures = 0
    for name in names():
        if build(name, num_ranks=1, num_microbatches=2).weight_update is not WeightUpdate.FLUSH:
            continue
        for model, num_microbatches, rows, recompute in [
            ("mlp", 3, 10, "none"),
            ("transformer", 2, 5, "full"),
            ("transformer", 4, 9, [2, 5]),
        ]:
            start = time.perf_counter()
            try:
                result = _cases.exact(
                    schedule=name,
                    num_microbatches=num_microbatches,
                    model=model,
                    rows=rows,
                    recompute=recompute,
                    device="cuda",
                )
                print(
                    f"ok   {name:18} {model:12} M={num_microbatches} {recompute!s:8} "
                    f"events={result['num_events']} "
                    f"act_bytes={result['activation_bytes_peak']} {time.perf_counter() - start:.2f}s",
                    flush=True,
                )
            except Exception as error:  # report every failure, not just the first
                failures += 1
                print(f"FAIL {name:18} {model:12} M={num_microbatches} {recompute!s:8}: {error}", flush=True)
    print("failures:", failures)
    sys.exit(1 if failures else 0)
