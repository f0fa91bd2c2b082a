"""How long `pipefold plan` takes at cluster scale: Megatron-LM's 1T GPT (Narayanan et al., SC'21,
Table 1's last row) on 3072 A100s, with the paper's configuration pinned and fully searched.

    python benchmarks/planner_scale.py             # both
    python benchmarks/planner_scale.py --pinned    # t=8, p=64, 512 micro-batches of 1 per replica
    python benchmarks/planner_scale.py --full --no-order-search   # the order search's budget at 0

Prints the seconds each search took, its simulations and its choice. A benchmark, not a test:
timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import time

from pipefold.plan import PlanOptions, plan
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.hardware import load_hardware
from pipefold.plan.orders import family_order, family_schedule

HARDWARE = load_hardware("a100-80gb")
MODEL = GptEstimate(num_layers=128, d_model=25600, num_heads=160, seq_len=2048, vocab_size=51200,
                    hardware=HARDWARE, megatron=True)
COMMON = {"num_devices": 3072, "global_batch": 3072, "hardware": HARDWARE, "max_tensor_parallel": 8,
          "recompute_attention": True}
CASES = {
    "pinned": {"num_ranks": 64, "tensor_parallel": 8, "microbatches": 512},
    "full": {},
}


def run(name: str, order_search: bool = True) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    # The order search is bounded by wall time: without it the CPU seconds are the rest's alone.
    budget = {} if order_search else {"order_search_s": 0.0, "order_search_total_s": 0.0}
    result = plan(MODEL, PlanOptions(**COMMON, **CASES[name], **budget))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    choice = result.choice
    # Orders generated as integer arrays (`family_order`), and of them those built as `Schedule`s (small
    # ones, families without an integer generator, and the one-micro-batch placements).
    orders = family_order.cache_info().misses
    schedules = family_schedule.cache_info().misses
    # CPU seconds beside wall seconds: on a shared machine the wall clock counts other jobs' time.
    print(f"{name}: {seconds:.2f} s ({cpu:.2f} s of CPU, load average {os.getloadavg()[0]:.1f}), "
          f"{result.num_simulated} simulations, {orders} family orders generated ({schedules} Schedules), "
          f"{result.num_order_searches} order "
          f"searches; choice {choice.degree_text}, {choice.describe()}, step {choice.step_time:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pinned", action="store_true", help="only the pinned configuration")
    parser.add_argument("--full", action="store_true", help="only the full search")
    parser.add_argument("--no-order-search", action="store_true", help="the order search's budget at 0")
    args = parser.parse_args()
    for name in CASES:
        if getattr(args, name) or not (args.pinned or args.full):
            run(name, order_search=not args.no_order_search)


if __name__ == "__main__":
    main()
