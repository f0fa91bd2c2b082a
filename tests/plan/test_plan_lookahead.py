"""The planner's choice of full sharding's gather look-ahead and freeing between micro-batches."""

import argparse
import json
import shlex
from dataclasses import replace

import pytest

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.plan import LayerCost, ModelCosts, PlanOptions, plan
from pipefold.plan.degree import allgather_time
from pipefold.plan.result import Candidate
from pipefold.plan.shard_search import (
    GATHER_LOOKAHEADS,
    gather_exposed,
    gathered_bytes,
    searched_layouts,
    simulate_sharded,
)
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.schedule import Op, add_sharding, build
from pipefold.schedule.shard import gather_waits
from pipefold.simulate import CostModel, Link, simulate
from pipefold.simulate.memory import gathered_weight_bytes_peak

P = 10_000
"""Parameter bytes per layer: large beside the activations, so the gathers decide the memory."""


def costs_of(num_layers=8):
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=10, output_bytes=10, parameter_bytes=P)
    return ModelCosts(layers=(layer,) * num_layers, reference_rows=1, overhead_s=0.1)


# dp=2 x pp=2, interleaved at v=2: each rank owns 2 stages of 2 layers (2P bytes each). On a link
# of 3e3 B/s a stage's ring all-gather moves P bytes: 3.3 s, beside 1 s forwards.
SLOW = Link(latency=0.0, bandwidth=3e3)
BASE = {"num_ranks": 2, "data_parallel": 2, "global_batch": 8, "order_search_s": 0,
        "schedules": ("interleaved-1f1b",), "virtual": 2, "microbatches": 4, "recompute": "none",
        "dp_link": SLOW, "shard": "full"}


def _sharded_timeline(choice: Candidate, free_between: bool, lookahead: int):
    """What the simulator makes of the choice's configuration with these sharding options."""
    schedule = build(choice.schedule, num_ranks=choice.num_ranks, num_microbatches=choice.num_microbatches,
                     num_virtual=choice.num_virtual)
    model = stage_cost_model(costs_of(), StageLayout(choice.bounds, choice.microbatch_rows), choice.recompute,
                             Link())
    return simulate_sharded(schedule, model, costs_of(), 2, SLOW, free_between, lookahead), model


def _reduce_scatter(model: CostModel) -> tuple[float, ...]:
    """Each stage's ring reduce-scatter over the two replicas on SLOW (half its bytes)."""
    return tuple(allgather_time(w, 2, SLOW) for w in model.weight_bytes)


def _overlap_of_first_late_gather(timeline, rank: int = 0) -> tuple[float, float]:
    """On `rank`, for the gather of a stage other than its first (the first is at the row's start,
    nothing to hide it behind): (seconds of compute running while it is in flight, seconds the rank
    waited right before its consumer)."""
    events = list(timeline.events[rank])
    actions = [event.action for event in events]
    first_stage = next(a.stage for a in actions if a.op.is_compute)
    waits = gather_waits(actions)
    consumer, unshard = next((c, u) for c, u in sorted(waits.items()) if actions[u].stage != first_stage)
    start, ready = events[unshard].start, events[consumer].start
    busy = sum(min(e.end, ready) - max(e.start, start) for e in events[unshard:consumer]
               if e.action.op.is_compute and e.end > start)
    idle = events[consumer].start - events[consumer - 1].end
    return busy, idle


def test_on_a_slow_link_the_look_ahead_wins_and_its_gather_overlaps_compute():
    found = plan(costs_of(), PlanOptions(**BASE))
    choice = found.choice
    assert choice.shard == "full" and choice.gather_lookahead in GATHER_LOOKAHEADS[1:]
    # Its step is the simulator's for that schedule; without the look-ahead the step is longer and
    # more of it waits for gathers.
    chosen, _ = _sharded_timeline(choice, choice.free_between_microbatches, choice.gather_lookahead)
    plain, _ = _sharded_timeline(choice, choice.free_between_microbatches, 0)
    assert choice.step_time == pytest.approx(chosen.makespan)
    assert plain.makespan > chosen.makespan * 1.01
    verdicts = {v.subject: v for v in found.settings}
    assert verdicts["shard=full"].status == "slower"
    assert f"shard=full+lookahead={choice.gather_lookahead}" in verdicts
    # The gather of rank 0's second stage: with the look-ahead compute runs while it is in flight
    # and the rank waits less for it; without, the rank sits idle for the whole gather.
    busy, idle = _overlap_of_first_late_gather(chosen)
    busy_plain, idle_plain = _overlap_of_first_late_gather(plain)
    assert busy > 0 and busy_plain == 0
    assert idle < idle_plain
    # The exposed gather time the plan reports: the step less the same schedule with instant gathers.
    _, model = _sharded_timeline(choice, choice.free_between_microbatches, choice.gather_lookahead)
    schedule = add_sharding(build(choice.schedule, num_ranks=2, num_microbatches=4, num_virtual=2),
                            free_between=choice.free_between_microbatches, lookahead=choice.gather_lookahead)
    instant = simulate(schedule, replace(model, gather=(0.0,) * model.num_stages,
                                         reduce_scatter=_reduce_scatter(model)))
    assert choice.gather_exposed_s == pytest.approx(chosen.makespan - instant.makespan)
    assert 0 < choice.gather_exposed_s
    assert f"gathers {choice.gather_lookahead} action" in found.explain()
    assert f"--gather-lookahead {choice.gather_lookahead}" in found.explain()


def test_a_limit_forces_freeing_between_microbatches_without_look_ahead():
    roomy = plan(costs_of(), PlanOptions(**BASE))
    # The least any (free, look-ahead) setting holds: freeing between micro-batches, gathering at
    # first use, holds one stage's whole weights at a time; a look-ahead holds the next one's too.
    free, model = _sharded_timeline(roomy.choice, True, 0)
    ahead, _ = _sharded_timeline(roomy.choice, True, 1)
    assert max(gathered_weight_bytes_peak(free, model)) < max(gathered_weight_bytes_peak(ahead, model))
    limit = min(c.peak_memory for c in plan(costs_of(), PlanOptions(**BASE, top=50)).top)
    found = plan(costs_of(), PlanOptions(**BASE, memory_limit=limit))
    choice = found.choice
    assert (choice.free_between_microbatches, choice.gather_lookahead) == (True, 0)
    assert choice.step_time > roomy.choice.step_time  # memory costs time here: more gathers, exposed
    verdicts = {v.subject: v.status for v in found.settings}
    assert verdicts["shard=full+free-between"] == "chosen"
    for ahead_k in GATHER_LOOKAHEADS[1:]:
        assert verdicts[f"shard=full+lookahead={ahead_k}"] == "over-memory"
    # The weights it holds: its shards beside the whole weights the simulated timeline holds at once.
    gathered = gathered_weight_bytes_peak(free, model)
    placement = build("interleaved-1f1b", num_ranks=2, num_microbatches=4, num_virtual=2).placement
    for rank, held in enumerate(choice.memory):
        shards = sum(-(-w // 2) for stage, w in enumerate(model.weight_bytes) if placement[stage] == rank)
        assert held.weights == shards + gathered[rank]
    assert "--free-between-microbatches" in found.explain() and "--gather-lookahead" not in found.explain()


@pytest.mark.parametrize("name", ["interleaved-1f1b", "zb-v"])
def test_the_gather_buffers_walked_from_the_rows_are_the_simulated_ones(name):
    schedule = build(name, num_ranks=2, num_microbatches=4, num_virtual=2)
    model = CostModel.uniform(4, gather=0.7, reduce_scatter=0.3)
    model = replace(model, weight_bytes=(1, 10, 100, 1000))
    costs = costs_of()
    for free in (False, True):
        for ahead in GATHER_LOOKAHEADS:
            timeline = simulate_sharded(schedule, model, costs, 2, Link(bandwidth=1.0), free, ahead)
            walked = gathered_bytes(name, 2, 4, 2, model.weight_bytes, free, ahead)
            assert walked == gathered_weight_bytes_peak(timeline, model), (free, ahead)
            assert any(e.action.op is Op.UNSHARD for e in timeline.events[0])


def test_look_ahead_and_freeing_are_searched_only_with_several_stages_per_rank():
    assert searched_layouts("full", False, 2, 1, 1) == (("full", False, 0),)
    several = searched_layouts("full", False, 2, 1, 2)
    assert {(free, ahead) for _, free, ahead in several} == {
        (free, ahead) for free in (False, True) for ahead in GATHER_LOOKAHEADS}


def test_the_cli_json_and_train_command_carry_the_look_ahead(capsys):
    gpt = ["--model", "gpt", "--num-layers", "4", "--d-model", "64", "--num-heads", "4", "--seq-len", "32",
           "--ranks", "2", "--data-parallel", "2", "--batch-size", "8", "--order-search", "0",
           "--schedule", "interleaved-1f1b", "--virtual", "2", "--microbatches", "4",
           "--shard", "full", "--dp-bandwidth", "1e5", "--json"]
    assert main(["plan", *gpt]) == 0
    result = json.loads(capsys.readouterr().out)
    choice = result["choice"]
    assert choice["shard"] == "full" and choice["gather_lookahead"] > 0
    assert choice["gather_exposed_s"] >= 0 and "free_between_microbatches" in choice
    assert Candidate.from_json(choice).gather_lookahead == choice["gather_lookahead"]
    words = shlex.split(result["train_command"])
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    config = train_cli.config_from_args(parser.parse_args(words[1:]))
    assert config.schedule.shard == "full"
    assert config.schedule.gather_lookahead == choice["gather_lookahead"]
    assert config.schedule.free_between_microbatches == choice["free_between_microbatches"]


@pytest.mark.parametrize("name", ["interleaved-1f1b", "zb-v"])
def test_the_default_variant_less_its_exposed_gathers_bounds_every_variant(name):
    # The search prunes free / look-ahead variants by this bound (`_Search.gathers_bound`).
    schedule = build(name, num_ranks=2, num_microbatches=6, num_virtual=2)
    for link in (SLOW, Link(latency=0.5, bandwidth=1e9), Link(bandwidth=1e5)):
        model = replace(CostModel.uniform(4, f=1.0, i=0.7, w=0.4), weight_bytes=(3 * P, P, 2 * P, P))
        default = simulate_sharded(schedule, model, costs_of(), 2, link, False, 0).makespan
        exposed = gather_exposed(schedule, model, costs_of(), 2, link, False, 0, default)
        assert exposed > 0
        for free in (False, True):
            for ahead in GATHER_LOOKAHEADS:
                step = simulate_sharded(schedule, model, costs_of(), 2, link, free, ahead).makespan
                assert step >= default - exposed - 1e-9, (link, free, ahead)


def test_every_shown_variant_has_its_exposed_gathers_priced():
    found = plan(costs_of(), PlanOptions(**BASE, top=3))
    assert all(c.gather_exposed_s is not None for c in found.top)
    assert "unpriced" not in found.explain()
    layouts = [v for v in found.settings if v.subject.startswith("shard=full")]
    assert len(layouts) == 6 and all("gathers exposed" in v.reason for v in layouts)
