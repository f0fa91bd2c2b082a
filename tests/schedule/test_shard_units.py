"""Full-sharding units (a rank's stages that gather as one: a V placement's tied first and last
stage) in the schedule and the simulator: one gather of the union at the unit's first UNSHARD,
the union held until its last RESHARD, one reduce-scatter at its last REDUCE_GRAD. One
process, no torch."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import ConfigError
from pipefold.schedule import (
    Op,
    add_sharding,
    build,
    gathers_per_step,
    join_units,
    lower,
    reductions_per_step,
    shard_units,
    unit_costs,
    validate,
)
from pipefold.schedule.shard import gather_waits
from pipefold.simulate import CostModel, simulate
from pipefold.simulate.memory import gathered_weight_bytes_peak

V_FAMILIES = ("zb-v", "dualpipe-v")


def _v(name: str, num_ranks: int, num_microbatches: int):
    return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches)


def test_join_units_groups_stages_holding_one_weight_transitively():
    assert join_units([0, 1, 2, 3, 5], [(0, 3), (3, 5), (2, 9)]) == ((0, 3, 5), (1,), (2,))
    assert join_units([4, 1]) == ((1,), (4,))


def test_shard_units_splits_a_tied_group_by_rank():
    placement = (0, 1, 1, 0)  # zb-v, 2 ranks
    assert shard_units(placement, [(0, 3)]) == ((0, 3), (1,), (2,))
    assert shard_units(placement) == ((0,), (1,), (2,), (3,))
    # 1f1b: the embedding and head on two ranks stay two units (their owners sum shards instead).
    assert shard_units((0, 1), [(0, 1)]) == ((0,), (1,))
    with pytest.raises(ConfigError, match="tied stage 4"):
        shard_units(placement, [(0, 4)])


def test_add_sharding_refuses_bad_units():
    schedule = _v("zb-v", 2, 4)
    with pytest.raises(ConfigError, match="spans ranks"):
        add_sharding(schedule, units=[(0, 1)])
    with pytest.raises(ConfigError, match="one unit"):
        add_sharding(schedule, units=[(0, 3), (3,)])


def test_a_unit_gathers_together_at_its_first_use_and_frees_after_its_last():
    schedule = _v("zb-v", 2, 4)
    units = shard_units(schedule.placement, [(0, 3)])
    row = add_sharding(schedule, units=units).actions[0]
    assert [str(a) for a in row[:3]] == ["UNSHARD0.0", "UNSHARD3.0", "F0.0"]
    assert [str(a) for a in row[-4:]] == ["REDUCE_GRAD0.0", "REDUCE_GRAD3.0", "RESHARD0.0", "RESHARD3.0"]
    # Without the unit each stage gathers apart: stage 3 right before its first forward.
    alone = add_sharding(schedule).actions[0]
    assert sum(a.op is Op.UNSHARD for a in alone[:3]) == 1


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(V_FAMILIES),
    num_ranks=st.integers(2, 4),
    extra_microbatches=st.integers(0, 4),
    free_between=st.booleans(),
    lookahead=st.integers(0, 3),
    tied=st.booleans(),
)
def test_counts_per_unit(name, num_ranks, extra_microbatches, free_between, lookahead, tied):
    """Every sharded V schedule validates and lowers; a unit gathers per run of its stages'
    actions (once per step unless freed between micro-batches, and rank 0's tied unit holds all
    its stages, so never freed between) and reduces once per step."""
    schedule = _v(name, num_ranks, 2 * num_ranks + extra_microbatches)
    last = schedule.num_stages - 1
    units = shard_units(schedule.placement, [(0, last)] if tied else [])
    sharded = add_sharding(schedule, units=units, free_between=free_between, lookahead=lookahead)
    validate(sharded)
    lower(sharded)
    gathers, reductions = gathers_per_step(sharded, units), reductions_per_step(sharded, units)
    assert sorted(gathers) == sorted(reductions) == [unit[0] for unit in units]
    assert all(count == 1 for count in reductions.values())
    if not free_between:
        assert all(count == 1 for count in gathers.values())
    if tied:
        assert (0, last) in units and gathers[0] == 1  # rank 0's only unit: nothing to free it for
    # Each UNSHARD of a member after the first of its block finds the unit held: one gather.
    per_stage = gathers_per_step(sharded)
    assert sum(gathers.values()) <= sum(per_stage.values())


def _costs(num_stages: int, weight_bytes: list[int], gather: float, reduce_scatter: float, units
           ) -> CostModel:
    gathers, reductions = unit_costs(
        units, num_stages, lambda unit: gather * len(unit), lambda unit: reduce_scatter * len(unit)
    )
    base = CostModel.uniform(num_stages, f=1.0, i=1.0, w=1.0)
    return replace(base, weight_bytes=tuple(weight_bytes), gather=gathers, reduce_scatter=reductions)


@pytest.mark.parametrize("name", V_FAMILIES)
@pytest.mark.parametrize(("free_between", "lookahead"), [(False, 0), (False, 2), (True, 0), (True, 1)])
def test_the_simulator_prices_one_gather_and_holds_the_union(name, free_between, lookahead):
    schedule = _v(name, 2, 4)
    units = shard_units(schedule.placement, [(0, 3)])
    weight_bytes = [100, 10, 20, 1000]
    costs = _costs(4, weight_bytes, gather=0.5, reduce_scatter=0.25, units=units)
    assert costs.gather == (1.0, 0.5, 0.5, 0.0) and costs.reduce_scatter == (0.0, 0.25, 0.25, 0.5)
    sharded = add_sharding(schedule, units=units, free_between=free_between, lookahead=lookahead)
    timeline = simulate(sharded, costs)
    row = timeline.events[0]
    # Rank 0 pays its unit's reduce-scatter once (stage 3's REDUCE_GRAD, after stage 0's, whose is free).
    reduce_s = [e.end - e.start for e in row if e.action.op is Op.REDUCE_GRAD]
    assert reduce_s == [0.0, 0.5]
    # The union (stages 0 and 3) is held from the unit's first gather to its last free.
    peaks = gathered_weight_bytes_peak(timeline, costs)
    assert peaks[0] == 1100
    starts = [e.start for e in row if e.action.op is Op.UNSHARD]
    ends = [e.end for e in row if e.action.op is Op.RESHARD]
    assert starts[0] == starts[1] and ends[-1] == ends[-2]
    # Only the first compute action after the unit's UNSHARDs waits for the gather: F0.0 (1 s).
    waits = gather_waits(sharded.actions[0])
    waited = [sharded.actions[0][i] for i in waits if sharded.actions[0][waits[i]].stage == 0]
    assert [str(a) for a in waited] == ["F0.0"]
    first = next(e for e in row if str(e.action) == "F0.0")
    assert first.start >= 1.0
