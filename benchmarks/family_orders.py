"""What the planner spends per family order at cluster scale: generating it as integer arrays,
compiling it, one timing and its held counts, for every family `fast_order` generates.

    python benchmarks/family_orders.py                 # 64 ranks x 512 micro-batches, v = 2
    python benchmarks/family_orders.py --ranks 32 --microbatches 128

Prints CPU seconds per part and the makespan (which a faster simulator must not change). A
benchmark, not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time

from pipefold.plan.fast_orders import fast_families, fast_order
from pipefold.plan.orders import held_counts_of
from pipefold.simulate import CostModel, Link
from pipefold.simulate.compiled import CompiledSchedule


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=512)
    args = parser.parse_args()
    totals = [0.0] * 4
    for name in fast_families():
        clock = time.process_time()
        order = fast_order(name, args.ranks, args.microbatches, 2)
        assert order is not None
        times = [time.process_time()]
        compiled = CompiledSchedule(order.shell(), order.rows)
        times.append(time.process_time())
        num_stages = order.num_stages
        costs = CostModel(
            num_stages=num_stages, f=tuple(1.0 + 0.01 * s for s in range(num_stages)), b=(2.0,) * num_stages,
            i=(1.1,) * num_stages, w=(0.9,) * num_stages,
            activation_bytes=tuple(100 + s for s in range(num_stages)), weight_grad_bytes=(7,) * num_stages,
            message_bytes=(50,) * (num_stages - 1), link=Link(latency=0.01, bandwidth=1e3),
            action_overhead=0.003)
        run = compiled.run(costs)
        times.append(time.process_time())
        held_counts_of(order)
        times.append(time.process_time())
        parts = [later - earlier for earlier, later in zip([clock, *times], times, strict=False)]
        totals = [total + part for total, part in zip(totals, parts, strict=True)]
        print(f"{name:18s} generate {parts[0]:6.3f} compile {parts[1]:6.3f} run {parts[2]:6.3f} "
              f"held {parts[3]:6.3f} s  makespan {run.makespan!r}")
    print("total: generate {:.3f}, compile {:.3f}, run {:.3f}, held counts {:.3f} s".format(*totals))


if __name__ == "__main__":
    main()
