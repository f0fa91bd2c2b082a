"""Write `plan()`'s JSON and explanation for a set of cluster-scale cases, to compare two checkouts.

    python benchmarks/planner_same.py OUT_DIR [--large]     # one file per case
    diff -r OUT_A OUT_B                                      # byte-identical when the plans agree

The order search's budget is 0, so the output depends on the planner's model and search only, not on
the clock. `--large` adds the two cases of benchmarks/planner_scale.py (a minute each on 2 cores).
Used to check that a faster search gives the same plans (docs/plan.md, "Scale and budgets").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from pipefold.plan import PlanOptions, plan
from pipefold.plan.errors import NoFeasiblePlan
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.hardware import load_hardware

HARDWARE = load_hardware("a100-80gb")
ONE_T = GptEstimate(num_layers=128, d_model=25600, num_heads=160, seq_len=2048, vocab_size=51200,
                    hardware=HARDWARE, megatron=True)
GPT_18B = GptEstimate(num_layers=40, d_model=6144, num_heads=48, seq_len=2048, vocab_size=51200,
                      hardware=HARDWARE, megatron=True)
GPT_145B = GptEstimate(num_layers=80, d_model=12288, num_heads=96, seq_len=2048, vocab_size=51200,
                       hardware=HARDWARE, megatron=True)
NO_SEARCH = {"order_search_s": 0.0, "order_search_total_s": 0.0, "hardware": HARDWARE}
CASES: dict[str, tuple[GptEstimate, dict[str, Any]]] = {
    "18b-256": (GPT_18B, {"num_devices": 256, "global_batch": 1024, "max_tensor_parallel": 8}),
    "18b-64-pinned": (GPT_18B, {"num_devices": 64, "global_batch": 512, "num_ranks": 8,
                                "tensor_parallel": 8}),
    "145b-128": (GPT_145B, {"num_devices": 128, "global_batch": 256, "max_tensor_parallel": 8,
                            "recompute_attention": True}),
    "145b-t8p16": (GPT_145B, {"num_devices": 128, "global_batch": 64, "num_ranks": 16, "tensor_parallel": 8}),
    "1t-512": (ONE_T, {"num_devices": 512, "global_batch": 512, "max_tensor_parallel": 8,
                       "recompute_attention": True}),
}
LARGE: dict[str, tuple[GptEstimate, dict[str, Any]]] = {
    "1t-3072-pinned": (ONE_T, {"num_devices": 3072, "global_batch": 3072, "max_tensor_parallel": 8,
                               "recompute_attention": True, "num_ranks": 64, "tensor_parallel": 8,
                               "microbatches": 512}),
    "1t-3072-full": (ONE_T, {"num_devices": 3072, "global_batch": 3072, "max_tensor_parallel": 8,
                             "recompute_attention": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--only", default="", help="one case by name")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = {**CASES, **(LARGE if args.large or args.only in LARGE else {})}
    for name, (model, options) in cases.items():
        if args.only and name != args.only:
            continue
        try:
            result = plan(model, PlanOptions(**NO_SEARCH, **options))
            text = json.dumps(result.to_json(), indent=1, sort_keys=True) + "\n" + result.explain() + "\n"
        except NoFeasiblePlan as error:
            text = f"NoFeasiblePlan: {error}\n"
        (args.out / f"{name}.txt").write_text(text)
        print(name, "done", file=sys.stderr)


if __name__ == "__main__":
    main()
