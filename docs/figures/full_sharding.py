"""Draws docs/figures/full_sharding.png: full sharding's gathers without and with a look-ahead.

    .venv/bin/python docs/figures/full_sharding.py

Interleaved-1F1B at pp = 2, v = 2, 4 micro-batches, F = I = W = 1 s per stage, a weight gather
of 2 s and a gradient reduce-scatter of 0.5 s per stage, simulated (`pipefold.simulate`) and
drawn with `pipefold.viz.render_png`: above, each gather issued right before the stage's first
action (the rank idles while it runs); below, issued 2 actions ahead (it runs under compute).
"""

from pathlib import Path

from pipefold.files import write_atomic
from pipefold.schedule import add_sharding, build
from pipefold.simulate import CostModel, simulate
from pipefold.viz import render_png


def main() -> None:
    schedule = build("interleaved-1f1b", num_ranks=2, num_microbatches=4, num_virtual=2)
    costs = CostModel.uniform(schedule.num_stages, gather=2.0, reduce_scatter=0.5)
    plain = simulate(add_sharding(schedule), costs)
    ahead = simulate(add_sharding(schedule, lookahead=2), costs)
    write_atomic(Path(__file__).with_suffix(".png"), render_png(ahead, compare=plain))
    print(f"gather at first use: {plain.makespan:.4g} s; 2 actions ahead: {ahead.makespan:.4g} s")


if __name__ == "__main__":
    main()
