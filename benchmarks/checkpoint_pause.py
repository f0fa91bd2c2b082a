"""How long a checkpoint save stops the training loop: synchronous against `--async-checkpoint`.

    .venv/bin/python benchmarks/checkpoint_pause.py                 # the main job's model, 2 CPU ranks
    .venv/bin/python benchmarks/checkpoint_pause.py --rounds 5 --d-model 256

Two spawned ranks set up `pipefold train`'s job (the default configuration unless flags change
the model), run two steps, then alternate, `--rounds` times, a `save_checkpoint` and an
`AsyncCheckpointer.save` of the same state into a scratch directory, each followed by one
training step. Prints, for rank 0, the median time each save call blocked the loop and (async)
the median time the background write then took to finish. Results: docs/checkpoint.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(overrides: dict[str, Any], rounds: int, scratch: str) -> None:
    import torch.distributed as dist

    from pipefold.job.config import load_config
    from pipefold.job.optim import accumulated_step
    from pipefold.job.setup import set_up
    from pipefold.runtime.checkpoint import save_checkpoint
    from pipefold.runtime.checkpoint_async import AsyncCheckpointer

    config = load_config(overrides={**overrides, "out": scratch})
    job = set_up(config)

    def step() -> None:
        accumulated_step(job.pipe, [job.next_batch()])
        assert job.optimizer is not None
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    saver = AsyncCheckpointer(job.pipe)
    blocked: dict[str, list[float]] = {"sync": [], "async": []}
    written: list[float] = []
    target = Path(scratch) / "checkpoint"
    for number in range(rounds):
        dist.barrier()
        started = time.perf_counter()
        save_checkpoint(job.pipe, target, optimizer=job.optimizers, step=number)
        blocked["sync"].append(time.perf_counter() - started)
        step()
        dist.barrier()
        started = time.perf_counter()
        saver.save(target, optimizer=job.optimizers, step=number)
        blocked["async"].append(time.perf_counter() - started)
        step()
        saver.wait()
        written.append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        parameters = sum(p.numel() for p in job.pipe.parameters())
        print(f"rank 0: {parameters} parameters, {rounds} rounds (medians)")
        for kind, times in blocked.items():
            print(f"  {kind:5s} save: the loop blocked {statistics.median(times) * 1e3:8.1f} ms")
        print(f"  async save: written and published after {statistics.median(written) * 1e3:8.1f} ms "
              "(one training step ran meanwhile)")
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--num-layers", type=int, default=None)
    args = parser.parse_args()
    overrides: dict[str, Any] = {"device": "cpu", "sample_tokens": 0}
    if args.d_model is not None:
        overrides["model.d_model"] = args.d_model
    if args.num_layers is not None:
        overrides["model.num_layers"] = args.num_layers
    from pipefold.job.config import load_config
    from pipefold.runtime.processes.launch import spawn

    with tempfile.TemporaryDirectory(prefix="pipefold-pause-") as scratch:
        ranks = load_config(overrides=overrides).schedule.num_processes
        result = spawn(_rank, ranks, (overrides, args.rounds, scratch))
    if not result.ok:
        print(result.describe(), file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
