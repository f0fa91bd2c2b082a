"""The planner: the fastest pipeline configuration that fits a memory limit, with its reasons.

No torch import: it reads per-layer costs (`ModelCosts`: measured with
`pipefold.runtime.profile` or estimated with `gpt_costs`), simulates candidate
configurations with `pipefold.simulate` and prices their memory. With
`PlanOptions(num_devices=N)` it also chooses the data-parallel degree: dp replicas of a
pp-rank pipeline, dp x pp = N (see docs/decisions.md, "Data-parallel step model").

    >>> from pipefold.plan import LayerCost, ModelCosts, PlanOptions, plan
    >>> layer = LayerCost(forward_s=1e-3, backward_s=2e-3, activation_bytes=2**20, output_bytes=2**16,
    ...                   parameter_bytes=2**22)
    >>> costs = ModelCosts(layers=(layer,) * 8)
    >>> result = plan(costs, PlanOptions(num_ranks=2, global_batch=8, memory_limit=2**30))
    >>> result.choice.schedule, result.choice.num_microbatches
    ('zb-v', 8)

It also searches schedules (orders of actions) for a `pipefold.simulate.CostModel`:
`find_schedule` / `search_schedule` (order_search.py), and `probe_schedule`, the step that
measures the costs they need (probe.py).
"""

from pipefold.plan.costs import LayerCost, ModelCosts, ProfileLike
from pipefold.plan.errors import NoFeasiblePlan
from pipefold.plan.estimate import gpt_costs
from pipefold.plan.memory import RankMemory
from pipefold.plan.order_search import FamilyBaseline, ScheduleSearch, find_schedule, search_schedule
from pipefold.plan.probe import probe_schedule
from pipefold.plan.result import Candidate, Plan, Verdict
from pipefold.plan.search import evaluate, plan
from pipefold.plan.space import Config, PlanOptions
from pipefold.plan.units import format_bytes, parse_bytes

__all__ = [
    "Candidate",
    "Config",
    "FamilyBaseline",
    "LayerCost",
    "ModelCosts",
    "NoFeasiblePlan",
    "Plan",
    "PlanOptions",
    "ProfileLike",
    "RankMemory",
    "ScheduleSearch",
    "Verdict",
    "evaluate",
    "find_schedule",
    "format_bytes",
    "gpt_costs",
    "parse_bytes",
    "plan",
    "probe_schedule",
    "search_schedule",
]
