"""Benchmark pipefold against torch.distributed.pipelining (and DeepSpeed when installed).

    python benchmarks/run.py --quick        # ~1 minute, one JSON line per configuration
    python benchmarks/run.py                # the full matrix; results in benchmarks/results/full.json
    python benchmarks/render.py benchmarks/results/full.json --out BENCHMARKS.md

See `python benchmarks/run.py --help` for the options. Both libraries run the same
8-layer models on the same seeded batches, in the same spawned ranks, alternating step
by step; the harness that does it is the `benchmarks.harness` package next to this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout: import this repository's pipefold and harness, whatever is installed
# (spawned ranks inherit sys.path, so they import the same code).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
