"""Benchmark pipefold against torch.distributed.pipelining (and DeepSpeed when installed).

    python benchmarks/run.py --quick        # ~1 minute, one JSON line per configuration
    python benchmarks/run.py                # the full matrix; results in benchmarks/results/full.json
    python benchmarks/render.py benchmarks/results/full.json --out BENCHMARKS.md

Same as `pipefold bench ...`; see `python benchmarks/run.py --help` for the options.
Both libraries run the same 8-layer models on the same seeded batches, in the same
spawned ranks, alternating step by step; see pipefold/bench/ for how.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

# Run from a checkout: import this repository's pipefold, whatever is installed (spawned ranks
# inherit sys.path, so they import the same code).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipefold.bench.cli import configure_parser, run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    args = parser.parse_args()
    args.command_line = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
