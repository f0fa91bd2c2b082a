"""Full sharding as schedule actions: where add_sharding puts UNSHARD / REDUCE_GRAD / RESHARD,
what validate refuses, and how the simulator prices them. One process, no torch."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError, ScheduleError
from pipefold.schedule import (
    Action,
    Op,
    add_sharding,
    build,
    gathers_per_step,
    is_sharded,
    lower,
    strip_sharding,
    validate,
)
from pipefold.schedule.io import from_json, to_json
from pipefold.simulate import CostModel, simulate
from pipefold.simulate.compiled import CompiledSchedule
from pipefold.simulate.memory import gathered_weight_bytes_peak

CASES = [("1f1b", None), ("zb-h1", None), ("interleaved-1f1b", 2), ("zb-v", None), ("zb-h2", None)]


def _build(name, num_virtual, num_microbatches=4, num_ranks=2):
    extra = {"num_virtual": num_virtual} if num_virtual else {}
    return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, **extra)


def _sharding_of(row, stage):
    return [str(a) for a in row if a.stage == stage and a.op.is_sharding]


@pytest.mark.parametrize(("name", "num_virtual"), CASES)
@pytest.mark.parametrize(("free_between", "lookahead"), [(False, 0), (True, 0), (False, 2), (True, 1)])
def test_every_option_gives_a_valid_schedule_whose_compute_order_is_unchanged(
    name, num_virtual, free_between, lookahead
):
    schedule = _build(name, num_virtual)
    sharded = add_sharding(schedule, free_between=free_between, lookahead=lookahead)
    validate(sharded)
    lower(sharded)  # the runtime's program: no message for a sharding action
    assert is_sharded(sharded) and not is_sharded(schedule)
    assert strip_sharding(sharded) == schedule
    for rank, row in enumerate(sharded.actions):
        for stage in schedule.stages_of(rank):
            # Reduced once, after the stage's last compute action, then freed.
            indices = [i for i, a in enumerate(row) if a.stage == stage]
            last_compute = max(i for i in indices if row[i].op.is_compute)
            assert row[last_compute + 1] == Action(Op.REDUCE_GRAD, stage, 0)
            assert row[last_compute + 2].op is Op.RESHARD and row[indices[-1]].op is Op.RESHARD
    assert to_json(from_json(to_json(sharded))) == to_json(sharded)  # actions parse back


def test_by_default_each_stage_is_gathered_once_before_its_first_forward():
    schedule = _build("interleaved-1f1b", 2)
    sharded = add_sharding(schedule)
    assert gathers_per_step(sharded) == {0: 1, 1: 1, 2: 1, 3: 1}
    row = sharded.actions[0]
    assert row[0] == Action(Op.UNSHARD, 0, 0) and row[1] == Action(Op.F, 0, 0)
    first_f2 = row.index(Action(Op.F, 2, 0))
    assert row[first_f2 - 1] == Action(Op.UNSHARD, 2, 0)


def test_free_between_frees_when_the_rank_turns_to_another_stage():
    schedule = _build("interleaved-1f1b", 2)
    sharded = add_sharding(schedule, free_between=True)
    row = sharded.actions[0]
    # F0.0 F0.1 then stage 2's forwards: stage 0 is freed in between, gathered again after.
    assert [str(a) for a in row[:6]] == ["UNSHARD0.0", "F0.0", "F0.1", "RESHARD0.0", "UNSHARD2.0", "F2.0"]
    # At most one stage's weights are gathered at any point of the row.
    gathered = set()
    for action in row:
        if action.op is Op.UNSHARD:
            gathered.add(action.stage)
            assert len(gathered) == 1, row
        elif action.op is Op.RESHARD:
            gathered.discard(action.stage)
    runs = sum(1 for i, a in enumerate(schedule.actions[0])
               if i == 0 or schedule.actions[0][i - 1].stage != a.stage)
    assert sum(1 for a in row if a.op is Op.UNSHARD) == runs
    # One stage per rank: nothing runs in between, so nothing changes.
    plain = _build("1f1b", None)
    assert add_sharding(plain, free_between=True).actions == add_sharding(plain).actions


def test_lookahead_starts_the_gather_k_actions_early_and_merges_short_gaps():
    schedule = _build("interleaved-1f1b", 2)
    row = add_sharding(schedule, lookahead=2).actions[0]
    # Stage 2's first forward is compute action 2 of the row: its gather moves to the start.
    assert [str(a) for a in row[:3]] == ["UNSHARD0.0", "UNSHARD2.0", "F0.0"]
    free = add_sharding(schedule, free_between=True, lookahead=1)
    assert sum(gathers_per_step(free).values()) < sum(
        gathers_per_step(add_sharding(schedule, free_between=True)).values()
    )


def test_bad_options_and_schedules_are_refused():
    schedule = _build("1f1b", None)
    with pytest.raises(ConfigError, match="lookahead"):
        add_sharding(schedule, lookahead=-1)
    with pytest.raises(ConfigError, match="free_between"):
        add_sharding(schedule, free_between=1)  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="already holds"):
        add_sharding(add_sharding(schedule))
    with pytest.raises(ScheduleError, match="flush schedule"):
        add_sharding(build("pipedream", num_ranks=2, num_microbatches=4))


def _edit(schedule, rank, row):
    actions = list(schedule.actions)
    actions[rank] = tuple(Action.parse(text) for text in row)
    return replace(schedule, actions=tuple(actions))


@pytest.mark.parametrize(
    ("row", "words"),
    [
        # A forward before its gather.
        (["F0.0", "UNSHARD0.0", "F0.1", "B0.0", "F0.2", "B0.1", "F0.3", "B0.2", "B0.3", "REDUCE_GRAD0.0",
          "RESHARD0.0"], "not gathered there"),
        # Never freed.
        (["UNSHARD0.0", "F0.0", "F0.1", "B0.0", "F0.2", "B0.1", "F0.3", "B0.2", "B0.3", "REDUCE_GRAD0.0"],
         "ends the step with stage 0"),
        # Reduced before the last backward.
        (["UNSHARD0.0", "F0.0", "F0.1", "B0.0", "F0.2", "B0.1", "F0.3", "B0.2", "REDUCE_GRAD0.0", "B0.3",
          "RESHARD0.0"], "after REDUCE_GRAD0.0"),
        # Never reduced.
        (["UNSHARD0.0", "F0.0", "F0.1", "B0.0", "F0.2", "B0.1", "F0.3", "B0.2", "B0.3", "RESHARD0.0"],
         "never reduces"),
        # Gathered twice without a free.
        (["UNSHARD0.0", "F0.0", "UNSHARD0.1", "F0.1", "B0.0", "F0.2", "B0.1", "F0.3", "B0.2", "B0.3",
          "REDUCE_GRAD0.0", "RESHARD0.0"], "already gathered"),
        # Misnumbered.
        (["UNSHARD0.1", "F0.0", "F0.1", "B0.0", "F0.2", "B0.1", "F0.3", "B0.2", "B0.3", "REDUCE_GRAD0.0",
          "RESHARD0.1"], "number 0"),
    ],
)
def test_validate_refuses_compute_outside_a_gather(row, words):
    sharded = add_sharding(_build("1f1b", None))
    with pytest.raises(ScheduleError, match=words):
        validate(_edit(sharded, 0, row))


def test_a_sharding_action_on_another_ranks_stage_is_refused():
    sharded = add_sharding(_build("1f1b", None))
    row = [str(a) for a in sharded.actions[0]] + ["UNSHARD1.1"]
    with pytest.raises(ScheduleError, match="placed on rank 1"):
        validate(_edit(sharded, 0, row))


def test_the_simulator_exposes_a_gather_issued_right_before_its_use_and_hides_one_issued_early():
    one = _build("1f1b", None, num_microbatches=8)
    plain = simulate(one, CostModel.uniform(2, f=1.0, i=1.0, w=1.0)).makespan
    # Rank 0's gather delays everything by 0.5 (rank 1's hides behind its wait for F0.0); rank
    # 0's reduction adds 0.25 at the end.
    one_costs = CostModel.uniform(2, f=1.0, i=1.0, w=1.0, gather=0.5, reduce_scatter=0.25)
    assert simulate(add_sharding(one), one_costs).makespan == pytest.approx(plain + 0.5 + 0.25)

    schedule = _build("interleaved-1f1b", 2, num_microbatches=8)
    costs = CostModel.uniform(4, f=1.0, i=1.0, w=1.0, gather=0.5, reduce_scatter=0.25)
    exposed = simulate(add_sharding(schedule), costs)
    gather_waits = [w for w in exposed.waits[0] if w.waiting_for == Action(Op.F, 0, 0)]
    assert gather_waits and gather_waits[0].end - gather_waits[0].start == pytest.approx(0.5)
    # With a look-ahead of 2 only stage 0's gather (first in the row) is still exposed there;
    # stage 2's overlaps F0.0 and F0.1.
    ahead = simulate(add_sharding(schedule, lookahead=2), costs)
    assert ahead.makespan < exposed.makespan
    f20 = next(e for e in ahead.events[0] if e.action == Action(Op.F, 2, 0))
    f01 = next(e for e in ahead.events[0] if e.action == Action(Op.F, 0, 1))
    assert f20.start == pytest.approx(f01.end)
    # The timeline holds every sharding action as an event.
    names = {str(e.action) for e in exposed.events[0]}
    assert {"UNSHARD0.0", "REDUCE_GRAD2.0", "RESHARD0.0"} <= names


def test_re_gathering_between_microbatches_costs_time_and_saves_gathered_bytes():
    schedule = _build("interleaved-1f1b", 2, num_microbatches=8)
    costs = CostModel.uniform(4, f=1.0, i=1.0, w=1.0, gather=0.3, weight_bytes=1000)
    once = simulate(add_sharding(schedule), costs)
    freed = simulate(add_sharding(schedule, free_between=True), costs)
    assert freed.makespan > once.makespan
    assert gathered_weight_bytes_peak(once, costs) == (2000, 2000)
    assert gathered_weight_bytes_peak(freed, costs) == (1000, 1000)
    assert gathered_weight_bytes_peak(simulate(schedule, costs), costs) == (0, 0)


def test_cost_model_carries_gather_and_reduce_times_through_json():
    costs = CostModel.from_lists([1.0, 1.0], [1.0, 1.0], [1.0, 1.0], gather=[0.1, 0.2],
                                 reduce_scatter=[0.3, 0.4])
    again = CostModel.from_json(costs.to_json())
    assert again.gather == (0.1, 0.2) and again.reduce_scatter == (0.3, 0.4)
    assert CostModel.uniform(2).gather == (0.0, 0.0)


def test_the_compiled_simulator_refuses_a_sharded_schedule():
    with pytest.raises(ScheduleError, match="sharding action"):
        CompiledSchedule(add_sharding(_build("1f1b", None)))


def test_torch_csv_writes_sharding_cells_as_torch_does_and_reads_them_back():
    from pipefold.schedule.io import from_torch_csv, to_torch_csv

    sharded = add_sharding(_build("interleaved-1f1b", 2), free_between=True)
    text = to_torch_csv(sharded)
    assert text.startswith("0UNSHARD,0F0,0F1,0RESHARD,2UNSHARD,")
    again = from_torch_csv(text, name=sharded.name)
    assert again.actions == sharded.actions
