"""Which dp x pp x tp splits the planner searches: those that can run the batch on the model, and
whose weights can fit. A floor on the weights, gradients and optimizer state some rank of a split
holds, before any partition, refuses a split whose every setting is over the limit without
balancing, bounding or searching its configurations (most splits of a large model on few
pipeline ranks).

    degrees = searched_degrees(options, costs, rejected)   # the others into `rejected`, with why
    floor = static_floor(costs, shard, num_ranks)   # bytes; some rank holds at least this
    reason = floor_problem(costs_at, configs, num_ranks, limit)   # None where some setting may fit
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipefold.plan.costs import ModelCosts
from pipefold.plan.degree import Degree, degree_problem
from pipefold.plan.space import Config, PlanOptions
from pipefold.plan.tensor import tensor_parallel_problem
from pipefold.plan.units import format_bytes

__all__ = ["searched_degrees", "static_floor", "floor_problem"]


def searched_degrees(options: PlanOptions, costs: ModelCosts, rejected: dict[tuple[int, int, int], str]
                     ) -> list[Degree]:
    """The dp x pp (x tp) splits to search; the others go to `rejected` with their reason."""
    found = []
    for dp, pp, tp in options.degree_splits():
        problem = degree_problem(options.global_batch, dp, options.microbatches, options.uneven)
        if problem is not None:
            rejected[(dp, pp, tp)] = f"dp={dp}: {problem}"
        elif pp > costs.num_layers:
            rejected[(dp, pp, tp)] = (
                f"pp={pp}: {pp} pipeline ranks need {pp} stages but the model has "
                f"{costs.num_layers} layers (a stage holds at least one)"
            )
        elif not costs.allows_tensor_parallel(tp):
            rejected[(dp, pp, tp)] = f"tp={tp}: {tensor_parallel_problem(costs)}"
        else:
            found.append(Degree(dp, pp, options.global_batch // dp, tp))
    return found


def static_floor(costs: ModelCosts, shard: str, num_ranks: int) -> float:
    """Bytes of weights, gradients and optimizer state that some rank of `num_ranks` holds at the
    peak, whatever the partition and placement: their total over the ranks, each tied weight once,
    shared evenly. `costs`: the split's per tp rank, with the ZeRO share of the optimizer state
    where `shard` shards it (as `pipefold.plan.memory.static_bytes` and
    `pipefold.plan.shard_search.sharded_static_bytes` price a rank: full sharding keeps only a
    shard of the weights, counted as none here)."""
    per_byte = (0.0 if shard == "full" else 1.0) + (
        costs.gradient_bytes_per_parameter_byte + costs.optimizer_bytes_per_parameter_byte)
    # A rank holding several layers of a tied weight holds it once: at most all but one copy saved.
    held = costs.parameter_bytes - sum(
        (len(group) - 1) * size for group, size in zip(costs.tied_layers, costs.tied_bytes, strict=True))
    # Each stage's weights are rounded to whole bytes and each rank's parts apart: a few bytes under.
    return max(0.0, (per_byte * max(held - len(costs.layers), 0) / num_ranks - 4) * (1 - 1e-9))


def floor_problem(
    costs_at: Callable[[int, bool, bool], ModelCosts], configs: Iterable[Config], num_ranks: int,
    limit: float,
) -> str | None:
    """Why a split of `num_ranks` pipeline ranks cannot fit `limit` bytes in any of `configs`
    (`costs_at(rows, recompute_attention, sharded)`: its costs), or None where one may."""
    settings = {(c.microbatch_rows, c.recompute_attention, c.shard) for c in configs}
    floor = min((static_floor(costs_at(rows, attention, shard != "replicate"), shard, num_ranks)
                 for rows, attention, shard in settings), default=0.0)
    if floor <= limit:
        return None
    where, least = ("rank 0", "") if num_ranks == 1 else ("some rank", "at least ")
    return (f"weights, gradients and optimizer state alone exceed the limit on {where} by {least}"
            f"{format_bytes(floor - limit)} in every setting" + (
                f" (their total shared over pp={num_ranks}); more pipeline or tensor-parallel ranks "
                "split them" if num_ranks > 1 else ""))
