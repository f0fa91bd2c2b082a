"""Cheap lower bounds on a configuration's step time, so most losers are never simulated.

A rank runs its actions one at a time, so a step lasts at least the rank's busy
time; and a rank's first action is a forward of its lowest stage s, which cannot
start before one micro-batch has gone forward through stages 0..s-1. Hence, for
every rank r, step >= sum(f[s] for s < first stage of r) + busy(r); and one
micro-batch's forward and input-gradient backward through every stage is a chain too. Transfers
and waits only add time, and recomputation only lengthens actions, so a bound
computed without them holds for the simulated step. Ranks that share `num_cores`
cores cannot do more than num_cores seconds of work per second, so the step also
lasts at least the total work / num_cores (sharing only ever slows an action).
"""

from __future__ import annotations

from pipefold.simulate import CostModel

__all__ = ["step_time_lower_bound"]


def step_time_lower_bound(model: CostModel, placement: tuple[int, ...], num_microbatches: int) -> float:
    num_ranks = max(placement) + 1
    busy = [0.0] * num_ranks
    first = [model.num_stages] * num_ranks
    for stage, rank in enumerate(placement):
        # A family runs either B or I + W for a stage; the cheaper one keeps the bound valid for both.
        backward = min(model.b[stage], model.i[stage] + model.w[stage])
        busy[rank] += num_microbatches * (model.f[stage] + backward)
        first[rank] = min(first[rank], stage)
    head = [0.0]
    for stage in range(model.num_stages):
        head.append(head[-1] + model.f[stage])
    # The backward chain runs through each stage's B or, split, only its I: a W waits for
    # nothing downstream and can run beside the chain, so it is not counted.
    chain = head[-1] + sum(min(b, i) for b, i in zip(model.b, model.i, strict=True))
    bound = max(chain, max(head[first[rank]] + busy[rank] for rank in range(num_ranks)))
    if model.num_cores is not None:
        # Ranks sharing cores (docs/decisions.md, "Shared cores") get through at most num_cores x the time
        # of work together.
        bound = max(bound, sum(busy) / min(model.num_cores, num_ranks))
    return bound
