"""`evaluate`: one configuration simulated and its memory priced, the planner's only source of
predictions (`plan` searches by calling it; `pipefold.plan.adaptive` prices per batch with it).

    candidate = evaluate(costs, Config("1f1b", 1, 8, 4), num_ranks=4, bounds=bounds, recompute=(),
                         link=link)
"""

from __future__ import annotations

import math
from dataclasses import replace

from pipefold.errors import ConfigError
from pipefold.plan.calibrate import first_stage_backward, update_time
from pipefold.plan.costs import ModelCosts
from pipefold.plan.degree import allgather_time, allreduce_time
from pipefold.plan.held_cost import (
    family_deferred_shares,
    family_state_weights,
    held_extra,
    prices_held,
    with_held_cost,
)
from pipefold.plan.memory import gradient_bytes, memory_of_peaks, rank_memory, static_weight_bytes
from pipefold.plan.orders import (
    compiled_family,
    compiles_order,
    family_order,
    family_placement,
    family_schedule,
    order_peaks,
)
from pipefold.plan.precision_costs import (
    cast_time,
    casts_every_forward,
    recast_every_forward,
    rerun_copies,
    without_held_casts,
)
from pipefold.plan.result import Candidate
from pipefold.plan.shard_search import gather_exposed, sharded_memory, simulate_sharded, stage_ties
from pipefold.plan.space import Config, is_asynchronous
from pipefold.plan.stages import StageLayout, stage_cost_model, transient_bytes
from pipefold.simulate import CostModel, Link, simulate

__all__ = ["evaluate", "replica_sync_time", "tied_exchange_time"]


def evaluate(
    costs: ModelCosts, config: Config, num_ranks: int, bounds: tuple[int, ...], recompute: tuple[int, ...],
    link: Link, *, num_data_parallel: int = 1, dp_link: Link | None = None, num_cores: float | None = None,
    num_tensor_parallel: int = 1, sharded_optimizer: bool = False, sequence_parallel: bool = False,
    link_overrides: tuple[tuple[tuple[int, int], Link], ...] = (), placed: str = "",
    recompute_attention: bool = False, rank_speeds: tuple[float, ...] = (),
    rank_limits: tuple[int, ...] = (), shard: str = "replicate", free_between: bool = False,
    gather_lookahead: int = 0, price_exposure: bool = True, memory_bandwidth: float = math.inf,
) -> Candidate:
    """Simulate one configuration and price its memory: the planner's only source of predictions.

    `num_ranks` is the pipeline's (pp); with `num_data_parallel` replicas the step adds the gradient
    all-reduce over `dp_link` (default `link`), see docs/decisions.md, "Data-parallel step model".
    `num_cores`: the pipeline's share of cores where ranks share them (`CostModel.num_cores`).
    With `num_tensor_parallel` > 1, `costs` are one tp rank's (`pipefold.plan.tensor.split_costs`);
    the candidate records the degree. `sharded_optimizer`: ZeRO-1, whose `costs` carry the
    optimizer bytes of one replica's share; the step adds the weights' all-gather.
    `sequence_parallel` is recorded: `costs` already split the stream (`split_costs`).
    `link_overrides`: the rank pairs whose sends cross nodes (`pipefold.plan.topology`), and
    `placed` how the mesh sits on the nodes, recorded. On a mix of device kinds, `rank_speeds`
    slow each rank's stages and `rank_limits` hold each rank to its devices' memory (recorded).
    `shard` "full": the schedule with its sharding actions (`free_between`: freed between
    micro-batches; `gather_lookahead`: each gather issued that many actions early) is simulated
    with the weight gathers and gradient reduce-scatters on `dp_link`, whose `costs` carry one
    replica's share of the optimizer state; with `price_exposure` (one more simulation) the
    candidate records how much of the step the gathers leave exposed, else None there
    (`pipefold.plan.shard_search`). `memory_bandwidth`: the device's (the hardware file's), at
    which the tied owners add their gradients after the exchange (`CostModel.tied_sum_bandwidth`).
    """
    sizes = (num_ranks, config.num_microbatches, config.num_virtual)
    placement = family_placement(config.schedule, num_ranks, config.num_virtual)
    layout = StageLayout(bounds, config.microbatch_rows)
    speeds = tuple(rank_speeds[rank] for rank in placement) if rank_speeds else None
    model = first_stage_backward(
        stage_cost_model(costs, layout, recompute, link, num_cores, link_overrides, speeds, memory_bandwidth),
        costs, bounds)
    recast = casts_every_forward(config.schedule, shard)
    if recast:  # no casts held for the step: each forward casts again (plan.precision_costs)
        model = recast_every_forward(model, costs, recompute, bounds)
    held: tuple[tuple[float, float], ...] = ()
    if prices_held(costs):  # each rank slowed by the activations it holds (plan.held_cost)
        peaks = _order_peaks(config, sizes, model)
        states = family_state_weights(config.schedule, *sizes) if costs.held_state_forward > 0 else ()
        held = held_extra(costs, peaks, placement, bounds, states)
        late = family_deferred_shares(config.schedule, *sizes) if costs.deferred_weight_grad > 0 else ()
        model = with_held_cost(model, costs, placement, peaks, bounds, states, late)
    transient = transient_bytes(costs, layout, recompute, placement, num_ranks,
                                rerun_copies(costs, config.schedule, shard))
    sync_link = link if dp_link is None else dp_link
    exposed: float | None = 0.0
    if shard == "full":
        if num_data_parallel == 1:
            raise ConfigError("shard = 'full' shards over data-parallel replicas and there are none (dp=1)")
        schedule = family_schedule(config.schedule, *sizes)
        ties = stage_ties(costs, bounds)  # a rank's stages holding one weight: one unit
        timeline = simulate_sharded(schedule, model, costs, num_data_parallel, sync_link, free_between,
                                    gather_lookahead, ties)
        makespan, bubble = timeline.makespan, timeline.bubble_fraction
        exposed = gather_exposed(schedule, model, costs, num_data_parallel, sync_link, free_between,
                                 gather_lookahead, makespan, ties) if price_exposure else None
        sharded = replace(config, free_between=free_between, gather_lookahead=gather_lookahead)
        counted = rank_memory(costs, model, timeline, placement, transient, config.num_microbatches)
        memory = sharded_memory(counted, model, sharded, placement, num_data_parallel, ties, costs)
    elif compiles_order(family_order(config.schedule, *sizes), model):
        # The compiled family order, built from its integer arrays: no `Schedule` of `Action`s.
        run = compiled_family(config.schedule, *sizes).run(model)
        makespan, bubble = run.makespan, run.bubble_fraction(num_ranks)
        weights = tuple(static_weight_bytes(model, placement, num_ranks))
        memory = memory_of_peaks(costs, model, weights, run.activation_peaks, placement, transient,
                                 run.later_peaks, config.num_microbatches)
    else:
        timeline = simulate(family_schedule(config.schedule, *sizes), model)
        makespan, bubble = timeline.makespan, timeline.bubble_fraction
        memory = rank_memory(costs, model, timeline, placement, transient, config.num_microbatches)
    allreduce = 0.0 if shard == "full" else replica_sync_time(
        costs, model, placement, num_ranks, num_data_parallel, sync_link, sharded_optimizer)
    tied = tied_exchange_time(costs, model, config.schedule, placement,
                              num_data_parallel if shard == "full" else 1)
    # The optimizer update after the schedule; ZeRO and full sharding update one replica's share.
    update_shared = sharded_optimizer or shard == "full"
    update = update_time(costs, static_weight_bytes(model, placement, num_ranks)) / (
        num_data_parallel if update_shared else 1)
    casts = cast_time(costs, model, config.schedule, shard, placement)
    if recast:
        memory = without_held_casts(memory)
    return Candidate(
        schedule=config.schedule,
        num_ranks=num_ranks,
        num_virtual=config.num_virtual,
        num_microbatches=config.num_microbatches,
        microbatch_rows=config.microbatch_rows,
        bounds=bounds,
        recompute=tuple(sorted(recompute)),
        step_time=makespan + allreduce + tied + update + casts,
        bubble_fraction=bubble,
        memory=memory,
        num_data_parallel=num_data_parallel,
        allreduce_s=allreduce,
        tied_exchange_s=tied,
        num_tensor_parallel=num_tensor_parallel,
        sharded_optimizer=sharded_optimizer,
        sequence_parallel=sequence_parallel,
        placed=placed,
        recompute_attention=recompute_attention,
        rank_speeds=rank_speeds,
        rank_limits=rank_limits,
        shard=shard if num_data_parallel > 1 else "replicate",
        free_between_microbatches=free_between and shard == "full",
        gather_lookahead=gather_lookahead if shard == "full" else 0,
        gather_exposed_s=exposed,
        held_slowdown=held,
    )


def _order_peaks(config: Config, sizes: tuple[int, int, int], model: CostModel) -> tuple[int, ...]:
    """Per rank, the activation peak of the family's order on `model` (the order fixes it; the
    timing does not): from the order's cached counts where it tells it, else simulated once."""
    peaks = None
    if compiles_order(family_order(config.schedule, *sizes), model):
        peaks = order_peaks(config.schedule, *sizes, model)
        if peaks is None:
            peaks = compiled_family(config.schedule, *sizes).order_activation_peaks(model)
    if peaks is None:
        peaks = simulate(family_schedule(config.schedule, *sizes), model).activation_bytes_peak
    return tuple(peaks)


def replica_sync_time(
    costs: ModelCosts, model: CostModel, placement: tuple[int, ...], num_ranks: int, num_replicas: int,
    link: Link, sharded_optimizer: bool,
) -> float:
    """After the schedule: the gradient all-reduce across replicas, and with ZeRO-1 the all-gather
    of the weights each replica updated (see docs/decisions.md, "Data-parallel step model")."""
    seconds = allreduce_time(max(gradient_bytes(costs, model, placement, num_ranks)), num_replicas, link)
    if sharded_optimizer:
        seconds += allgather_time(max(static_weight_bytes(model, placement, num_ranks)), num_replicas, link)
    return seconds


def tied_exchange_time(
    costs: ModelCosts, model: CostModel, schedule: str, placement: tuple[int, ...], num_shards: int = 1,
) -> float:
    """After a flush schedule, the sum of each tied weight's gradient (`ModelCosts.tied_layers`: a
    tied embedding and head) over the pipeline ranks that hold it, as the runtime runs it
    (`pipefold.runtime.tied.TiedGradients.sum`): each owner sends its gradient to the other and
    receives theirs at once, on the link between their devices (`model`'s pipeline links,
    `CostModel.tied_exchange_time`), before the replicas' all-reduce. `costs` are one tp rank's: a
    table split by vocabulary exchanges its rows. `num_shards`: full sharding's replicas, whose
    owners sum their gradient shards. 0 where one rank holds both ends (zb-v's rank 0) or the
    schedule updates inside the step (it sums at each STEP: not priced)."""
    if not model.tied_weights or is_asynchronous(schedule):
        return 0.0
    per_byte = costs.gradient_bytes_per_parameter_byte / num_shards
    return model.tied_exchange_time(placement, per_byte)
