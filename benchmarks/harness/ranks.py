"""Start a benchmark script's `--worker` half on N ranks through `pipefold launch`.

The per-action benchmarks (overhead, hop, wait_share, ...) are one script each: `main` parses
the flags and calls `launch_workers(__file__, ranks, worker_args, code=...)`, and every rank
runs the same script with `--worker`. `code` is the checkout whose pipefold the ranks import
(its own, or a `git archive` of another commit to compare with).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def launch_workers(
    script: str | Path, num_ranks: int, worker_args: Sequence[str], *, code: str | Path, timeout: float,
    capture: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `script` with `worker_args` on `num_ranks` ranks, pipefold imported from `code`
    (also their working directory); `capture` keeps their output in the result instead of
    passing it through."""
    return subprocess.run(
        [sys.executable, "-m", "pipefold", "launch", "-n", str(num_ranks), "--", str(script), *worker_args],
        env={**os.environ, "PYTHONPATH": str(code)}, cwd=code, timeout=timeout,
        capture_output=capture, text=True, check=False,
    )
