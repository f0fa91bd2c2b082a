"""The runtime's full-sharding units against the torch-free description the simulator and the
planner use (`pipefold.schedule.shard_units`, `gathers_per_step`, `reductions_per_step`).

One process: `_joined` (how `FullSharding` groups its stages into FSDP units) runs on stand-in
stages, and `FullSharding`'s own UNSHARD / RESHARD / REDUCE_GRAD handlers run a rank's sharded
row with a stand-in for the FSDP module (no process group), counting the collectives they start.
tests/runtime/test_full_shard_compose.py checks the same counts on four real ranks."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pipefold.runtime.parallel.full_shard import FullSharding, _joined, _Unit
from pipefold.schedule import Op, add_sharding, build, gathers_per_step, reductions_per_step, shard_units
from pipefold.schedule.shard import gather_waits


class _Module:
    """What FullSharding calls on an FSDP module, recorded."""

    def __init__(self) -> None:
        self.gathered = False
        self.num_gathers = self.num_frees = 0

    def unshard(self, async_op: bool) -> SimpleNamespace:
        assert not self.gathered, "gathered twice without a free"
        self.gathered = True
        self.num_gathers += 1
        return SimpleNamespace(wait=lambda: None)

    def reshard(self) -> None:
        assert self.gathered
        self.gathered = False
        self.num_frees += 1

    def set_requires_gradient_sync(self, value: bool) -> None:
        pass

    def set_reshard_after_backward(self, value: bool) -> None:
        pass

    def set_is_last_backward(self, value: bool) -> None:
        pass

    def _get_fsdp_state(self) -> SimpleNamespace:
        return SimpleNamespace(
            _state_ctx=SimpleNamespace(all_states=[]), _root_post_backward_final_callback=lambda: None
        )


def _sharding(units: tuple[tuple[int, ...], ...], free_between: bool, lookahead: int) -> FullSharding:
    """A FullSharding over stand-in FSDP modules, one per unit (what `__init__` builds with ranks)."""
    sharding = FullSharding.__new__(FullSharding)
    sharding._stages = {stage: SimpleNamespace(index=stage, module=nn.Module(), parameters=())
                        for unit in units for stage in unit}
    sharding._units = [_Unit(_Module(), unit) for unit in units]  # type: ignore[arg-type]
    sharding._unit_of = {stage: unit for unit in sharding._units for stage in unit.stages}
    sharding._handles = {}
    sharding._free_between, sharding._lookahead = free_between, lookahead
    sharding.num_gathers = sharding.num_reductions = 0
    return sharding


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(("zb-v", "dualpipe-v")),
    num_ranks=st.integers(2, 4),
    extra_microbatches=st.integers(0, 3),
    free_between=st.booleans(),
    lookahead=st.integers(0, 3),
    tied=st.booleans(),
)
def test_the_runtime_runs_the_collectives_the_schedule_counts(
    name, num_ranks, extra_microbatches, free_between, lookahead, tied
):
    schedule = build(name, num_ranks=num_ranks, num_microbatches=2 * num_ranks + extra_microbatches)
    last = schedule.num_stages - 1
    tied_stages = [(0, last)] if tied else []
    units = shard_units(schedule.placement, tied_stages)
    sharded = add_sharding(schedule, units=units, free_between=free_between, lookahead=lookahead)
    gathers, reductions = gathers_per_step(sharded, units), reductions_per_step(sharded, units)
    shared = nn.Parameter(nn.Linear(1, 1).weight.detach())
    for rank, row in enumerate(sharded.actions):
        mine = tuple(unit for unit in units if schedule.placement[unit[0]] == rank)
        # The runtime's grouping of this rank's stages, by parameter identity, is the description's.
        stages = [SimpleNamespace(index=stage, parameters=(nn.Parameter(shared.detach().clone()),))
                  for unit in mine for stage in unit]
        if tied and rank == 0:
            for stage in stages:
                if stage.index in (0, last):
                    stage.parameters = (*stage.parameters, shared)
        assert tuple(tuple(s.index for s in group) for group in _joined(stages)) == mine
        sharding = _sharding(mine, free_between, lookahead)
        waits = gather_waits(row)
        for steps in range(2):
            for index, action in enumerate(row):
                unit = sharding._unit_of[action.stage]
                if action.op is Op.UNSHARD:
                    sharding.unshard(action.stage)
                elif action.op is Op.RESHARD:
                    sharding.reshard(action.stage)
                elif action.op is Op.REDUCE_GRAD:
                    sharding.reduce_grad(action.stage)
                else:
                    if index in waits:
                        sharding.wait_gathered(action.stage)
                    assert unit.module.gathered, f"{action} ran on sharded weights"  # type: ignore[attr-defined]
            assert sharding.num_gathers == (steps + 1) * sum(gathers[unit[0]] for unit in mine)
            assert sharding.num_reductions == (steps + 1) * sum(reductions[unit[0]] for unit in mine)
        for unit in sharding._units:
            module = unit.module
            assert not module.gathered  # type: ignore[attr-defined]
            assert module.num_gathers == module.num_frees == 2 * gathers[unit.stages[0]]  # type: ignore[attr-defined]
