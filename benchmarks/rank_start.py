"""How long a tiny `pipefold train` takes with ranks forked from the torch-preloaded server
(the default) against ranks spawned fresh (each importing torch), alternated in one run.

    python benchmarks/rank_start.py                 # 3 rounds, 2 ranks
    python benchmarks/rank_start.py --ranks 4 --rounds 2

Each run trains 2 steps of a d=32 GPT, so the wall time is mostly starting the ranks. Prints one
line per run and the medians. A benchmark, not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipefold.cli.main import main as pipefold_main  # noqa: E402
from pipefold.runtime.processes import launch  # noqa: E402

_FORK_SERVER = launch.rank_context


def _spawned() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("spawn")


def _train(num_ranks: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        code = pipefold_main([
            "train", "--steps", "2", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
            "--seq-len", "32", "--batch-size", "8", "--microbatches", "2", "--set", "data.max_bytes=100000",
            "--set", "sample_tokens=0", "--set", "eval_every=0", "--device", "cpu",
            "--ranks", str(num_ranks), "--out", out, "--overwrite",
        ])
        seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"pipefold train exited {code}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"fork server": [], "spawn": []}
    for _ in range(args.rounds):
        for name, context in (("fork server", _FORK_SERVER), ("spawn", _spawned)):
            launch.rank_context = context  # type: ignore[assignment]
            seconds = _train(args.ranks)
            times[name].append(seconds)
            print(f"{name}: {seconds:.2f} s", flush=True)
    for name, values in times.items():
        print(f"median {name}: {statistics.median(values):.2f} s over {len(values)} runs")


if __name__ == "__main__":
    main()
