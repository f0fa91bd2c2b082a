"""Full sharding in the schedule: where each stage's weights are gathered (`UNSHARD`), its
gradients reduce-scattered over the data-parallel replicas (`REDUCE_GRAD`) and its gathered
weights freed (`RESHARD`).

    sharded = add_sharding(schedule)                      # gather once per stage per step
    sharded = add_sharding(schedule, free_between=True)   # free while the rank's other stages run
    sharded = add_sharding(schedule, lookahead=2)         # start each gather 2 actions early
    units = shard_units(schedule.placement, tied=[(0, schedule.num_stages - 1)])
    sharded = add_sharding(schedule, units=units)         # a V's tied first and last stage: one unit
    program = lower(sharded)                              # what the runtime runs
    timeline = simulate(sharded, costs)                   # prices CostModel.gather / .reduce_scatter

Every data-parallel replica of a pipeline rank runs the same row, so the replicas issue the
same collectives in the same order. Why these places: docs/parallelism.md, "Full sharding".

A *unit* is the stages of one rank that gather as one (FSDP shards a weight in one unit only):
one stage, or the stages of a rank that hold one weight, such as a V placement's first and last
stage with a tied embedding and head (`shard_units`). The runtime builds its FSDP units with
`join_units` and the planner with `shard_units`, so both group alike. `add_sharding(units=)`
gives a unit's stages their UNSHARDs together at the unit's first use, their REDUCE_GRADs and
RESHARDs together after its last backward action, in unit order: the runtime gathers at the
first UNSHARD, reduce-scatters at the last REDUCE_GRAD and frees at the last RESHARD, so a
cost model that puts the unit's gather on its first stage and its reduce-scatter on its last
(`unit_costs`) prices what runs, and its gathered bytes are the union's from the first gather
to the last free. `gathers_per_step` / `reductions_per_step` count collectives per unit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from pipefold.errors import ConfigError, ScheduleError
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate, format_grid

__all__ = [
    "add_sharding", "check_sharding", "gather_waits", "gathers_per_step", "is_sharded", "join_units",
    "reductions_per_step", "shard_units", "strip_sharding", "unit_costs",
]

_WEIGHT_OPS = frozenset({Op.F, Op.B, Op.I, Op.W})
"""The compute ops that read a stage's whole weights (and I/W, B: write its whole gradients)."""


def is_sharded(schedule: Schedule) -> bool:
    """Whether the schedule holds sharding actions."""
    return any(action.op.is_sharding for row in schedule.actions for action in row)


def gather_waits(actions: Sequence[Action]) -> dict[int, int]:
    """In one rank's actions: {index of each compute action that first uses a stage's weights
    after an UNSHARD of it: index of that UNSHARD}. Those actions wait for the gather (the
    executor waits there, the simulator and the measured costs time the gather to there)."""
    pending: dict[int, int] = {}
    found: dict[int, int] = {}
    for index, action in enumerate(actions):
        if action.op is Op.UNSHARD:
            pending[action.stage] = index
        elif action.op.is_compute and action.stage in pending:
            found[index] = pending.pop(action.stage)
    return found


def add_sharding(
    schedule: Schedule,
    *,
    free_between: bool = False,
    lookahead: int = 0,
    stages: Iterable[int] | None = None,
    units: Iterable[Iterable[int]] = (),
) -> Schedule:
    """`schedule` with UNSHARD / REDUCE_GRAD / RESHARD actions for every stage in `stages`
    (default: all).

    - By default a stage's weights are gathered before its first forward of the step and kept
      for every micro-batch; after its last backward action (B or W) its gradients are
      reduce-scattered once (`REDUCE_GRAD`) and the whole weights freed (`RESHARD`).
    - `free_between=True` frees them whenever the rank turns to another of its stages and
      gathers them again before the stage's next action: at most one stage's whole weights
      per rank at a time (with `lookahead` 0), at the price of one gather per run of actions.
      With one stage per rank nothing else runs between, so it changes nothing.
    - `lookahead=k` issues each gather k actions of the rank's row before the action that
      needs it, so it overlaps that compute; two runs of a stage separated by k actions or
      fewer keep the weights instead (a gather could not start any earlier).
    - `units`: groups of one rank's stages that gather as one (`shard_units`; a stage in none
      is its own unit). A unit's runs are those of its stages' actions together; each run
      starts with an UNSHARD of every stage of the unit, in unit order, and the last one ends
      with their REDUCE_GRADs, then their RESHARDs (see the module docstring).

    Raises ConfigError for a bad option and ScheduleError for a schedule that cannot be
    sharded (an asynchronous one, or one that already holds sharding actions).
    """
    if not isinstance(free_between, bool):
        raise ConfigError(f"free_between = {free_between!r}; use True or False")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
        raise ConfigError(
            f"lookahead = {lookahead!r}; give an integer >= 0 (how many actions before its first "
            "use a stage's gather starts; 0: right before it)"
        )
    if schedule.weight_update is not WeightUpdate.FLUSH:
        raise ScheduleError(
            f"{schedule.name or 'schedule'}: weight_update={schedule.weight_update} updates weights "
            "inside the step from whole stashed copies; full sharding needs a flush schedule"
        )
    if is_sharded(schedule):
        raise ScheduleError(
            f"{schedule.name or 'schedule'} already holds sharding actions; add them once "
            "(strip_sharding gives the compute schedule back)"
        )
    wanted = set(range(schedule.num_stages)) if stages is None else set(stages)
    unit_of = _unit_of(schedule, units)
    rows = []
    for row in schedule.actions:
        before: dict[int, list[Action]] = defaultdict(list)
        after: dict[int, list[Action]] = defaultdict(list)
        positions: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for position, action in enumerate(row):
            if action.op in _WEIGHT_OPS and action.stage in wanted:
                positions[unit_of.get(action.stage, (action.stage,))].append(position)
        for unit in sorted(positions):
            members = [stage for stage in unit if stage in wanted]
            runs = _runs(positions[unit], free_between, lookahead)
            for k, (start, end) in enumerate(runs):
                before[max(start - lookahead, 0)].extend(Action(Op.UNSHARD, stage, k) for stage in members)
                if k == len(runs) - 1:
                    after[end].extend(Action(Op.REDUCE_GRAD, stage, 0) for stage in members)
                after[end].extend(Action(Op.RESHARD, stage, k) for stage in members)
        sharded: list[Action] = []
        for position, action in enumerate(row):
            sharded.extend(before.get(position, ()))
            sharded.append(action)
            sharded.extend(after.get(position, ()))
        rows.append(tuple(sharded))
    suffix = "+shard" + ("-free" if free_between else "") + (f"-ahead{lookahead}" if lookahead else "")
    return replace(schedule, name=f"{schedule.name}{suffix}", actions=tuple(rows))


def join_units(stages: Iterable[int], tied: Iterable[Iterable[int]] = ()) -> tuple[tuple[int, ...], ...]:
    """`stages` (one rank's) in units: the stages of each group of `tied` (stages that hold one
    weight) together, and through shared members transitively; each other stage alone. Units
    in stage order, ordered by their first stage. Stages of `tied` not in `stages` are ignored."""
    mine = sorted(set(stages))
    parent = {stage: stage for stage in mine}

    def find(stage: int) -> int:
        while parent[stage] != stage:
            stage = parent[stage]
        return stage

    for group in tied:
        held = sorted({stage for stage in group if stage in parent})
        for stage in held[1:]:
            a, b = find(held[0]), find(stage)
            if a != b:
                parent[max(a, b)] = min(a, b)
    units: dict[int, list[int]] = defaultdict(list)
    for stage in mine:
        units[find(stage)].append(stage)
    return tuple(sorted(tuple(unit) for unit in units.values()))


def shard_units(
    placement: Sequence[int], tied: Iterable[Iterable[int]] = (), stages: Iterable[int] | None = None
) -> tuple[tuple[int, ...], ...]:
    """Every rank's units (`join_units` of the stages `placement` gives it, default all, with
    `tied`: groups of stages that hold one weight, such as `(0, num_stages - 1)` for a tied
    embedding and head), ordered by first stage. A tied group spread over ranks joins only
    its stages on one rank: other ranks' copies are their own FSDP units."""
    tied = [tuple(group) for group in tied]
    for group in tied:
        for stage in group:
            if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < len(placement):
                raise ConfigError(f"tied stage {stage!r} in {group}: give stages in 0..{len(placement) - 1}")
    wanted = set(range(len(placement))) if stages is None else set(stages)
    found: list[tuple[int, ...]] = []
    for rank in sorted(set(placement)):
        mine = [stage for stage, owner in enumerate(placement) if owner == rank and stage in wanted]
        found.extend(join_units(mine, tied))
    return tuple(sorted(found))


def _unit_of(schedule: Schedule, units: Iterable[Iterable[int]]) -> dict[int, tuple[int, ...]]:
    """{stage: its unit} for the stages of `units`, after checking them against `schedule`."""
    found: dict[int, tuple[int, ...]] = {}
    for given in units:
        unit = tuple(sorted(set(given)))
        if not unit or any(
            isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < schedule.num_stages
            for stage in unit
        ):
            raise ConfigError(f"units: {tuple(given)!r}; give stages in 0..{schedule.num_stages - 1}")
        ranks = {schedule.placement[stage] for stage in unit}
        if len(ranks) > 1:
            raise ConfigError(
                f"units: {unit} spans ranks {sorted(ranks)}; a unit is stages of one rank "
                "(shard_units splits a tied group by rank)"
            )
        for stage in unit:
            if stage in found:
                raise ConfigError(
                    f"units: stage {stage} is in {found[stage]} and {unit}; give each stage one unit"
                )
            found[stage] = unit
    return found


def unit_costs(
    units: Iterable[Sequence[int]],
    num_stages: int,
    gather: Callable[[Sequence[int]], float],
    reduce_scatter: Callable[[Sequence[int]], float],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per stage, gather and reduce-scatter seconds for `CostModel.gather` / `.reduce_scatter`
    from each unit's (`gather(unit)`, `reduce_scatter(unit)`): a unit's gather on its first
    stage, whose UNSHARD starts it, its reduce-scatter on its last, whose REDUCE_GRAD runs it
    (`add_sharding(units=)` orders them so); 0 on the others. Stages in no unit are their own."""
    gathers = [0.0] * num_stages
    reductions = [0.0] * num_stages
    covered: set[int] = set()
    every = [tuple(sorted(unit)) for unit in units]
    for unit in every:
        covered.update(unit)
    every += [(stage,) for stage in range(num_stages) if stage not in covered]
    for unit in every:
        gathers[unit[0]] = gather(unit)
        reductions[unit[-1]] = reduce_scatter(unit)
    return tuple(gathers), tuple(reductions)


def _runs(positions: list[int], free_between: bool, lookahead: int) -> list[tuple[int, int]]:
    """(first, last) row positions of each span a stage's weights stay gathered."""
    if not free_between:
        return [(positions[0], positions[-1])]
    runs = [[positions[0], positions[0]]]
    for position in positions[1:]:
        # Freed only when more than `lookahead` other actions run in between: otherwise the
        # next gather would start right where the free happened.
        if position - runs[-1][1] - 1 <= lookahead:
            runs[-1][1] = position
        else:
            runs.append([position, position])
    return [(start, end) for start, end in runs]


def strip_sharding(schedule: Schedule) -> Schedule:
    """The compute schedule: `schedule` without its sharding actions (itself if it has none)."""
    if not is_sharded(schedule):
        return schedule
    rows = tuple(tuple(a for a in row if not a.op.is_sharding) for row in schedule.actions)
    name = schedule.name.split("+shard", 1)[0]
    return replace(schedule, name=name, actions=rows)


def gathers_per_step(schedule: Schedule, units: Iterable[Iterable[int]] = ()) -> dict[int, int]:
    """{unit's first stage: weight all-gathers one step runs}, for the units the schedule shards
    (`units` as `add_sharding` takes them; a stage in none is its own): an UNSHARD gathers when
    none of its unit's stages holds the weights, as the runtime's does."""
    return _collectives(schedule, units)[0]


def reductions_per_step(schedule: Schedule, units: Iterable[Iterable[int]] = ()) -> dict[int, int]:
    """{unit's first stage: gradient reduce-scatters one step runs}: a unit's REDUCE_GRADs
    reduce once all of its stages have reached theirs, as the runtime's do."""
    return _collectives(schedule, units)[1]


def _collectives(schedule: Schedule, units: Iterable[Iterable[int]]) -> tuple[dict[int, int], dict[int, int]]:
    unit_of = _unit_of(schedule, units)
    gathers: dict[int, int] = defaultdict(int)
    reductions: dict[int, int] = defaultdict(int)
    for row in schedule.actions:
        holders: dict[tuple[int, ...], set[int]] = defaultdict(set)
        reduced: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for action in row:
            if not action.op.is_sharding:
                continue
            unit = unit_of.get(action.stage, (action.stage,))
            if action.op is Op.UNSHARD:
                if not holders[unit]:
                    gathers[unit[0]] += 1
                holders[unit].add(action.stage)
            elif action.op is Op.RESHARD:
                holders[unit].discard(action.stage)
            else:
                reduced[unit].add(action.stage)
                if len(reduced[unit]) == len(unit):
                    reduced[unit].clear()
                    reductions[unit[0]] += 1
    return dict(gathers), dict(reductions)


def check_sharding(schedule: Schedule) -> None:
    """Raise ScheduleError unless every sharded stage's compute actions run on gathered
    weights: UNSHARD s.k (k = 0, 1, ...) ... RESHARD s.k around them, one REDUCE_GRAD s.0
    after the stage's last compute action and before its last RESHARD. Stages without
    sharding actions are not checked; a schedule without any passes."""
    if not is_sharded(schedule):
        return
    name = schedule.name or "schedule"

    def fail(message: str, cell: tuple[int, int] | None) -> ScheduleError:
        return ScheduleError(f"{name}: {message}\n{format_grid(schedule.actions, mark=cell)}")

    if schedule.weight_update is not WeightUpdate.FLUSH:
        raise fail(f"sharding actions in a weight_update={schedule.weight_update} schedule; "
                   "full sharding needs a flush schedule", None)
    for rank, row in enumerate(schedule.actions):
        sharded = {a.stage for a in row if a.op.is_sharding}
        gathered: dict[int, bool] = dict.fromkeys(sharded, False)
        counts: dict[tuple[Op, int], int] = defaultdict(int)
        reduced: dict[int, int] = {}
        last_compute: dict[int, int] = {}
        for position, action in enumerate(row):
            stage, cell = action.stage, (rank, position)
            if stage not in sharded:
                continue
            if action.op in _WEIGHT_OPS:
                last_compute[stage] = position
                if not gathered[stage]:
                    raise fail(
                        f"{action} runs on stage {stage}'s whole weights, which are not gathered "
                        f"there; put UNSHARD{stage}.k before it", cell,
                    )
                if stage in reduced:
                    raise fail(f"{action} runs after REDUCE_GRAD{stage}.0 already reduced the "
                               "stage's gradients; reduce after its last backward action", cell)
                continue
            if not action.op.is_sharding:
                continue
            expected = counts[(action.op, stage)]
            if action.microbatch != expected:
                raise fail(f"{action} is number {expected} of its kind on stage {stage}; number "
                           f"them 0, 1, ... in order ({action.op}{stage}.{expected})", cell)
            counts[(action.op, stage)] += 1
            if action.op is Op.UNSHARD:
                if gathered[stage]:
                    raise fail(f"{action}: stage {stage}'s weights are already gathered; "
                               f"RESHARD{stage} first", cell)
                gathered[stage] = True
            elif action.op is Op.RESHARD:
                if not gathered[stage]:
                    raise fail(f"{action}: stage {stage}'s weights are not gathered", cell)
                gathered[stage] = False
            else:  # REDUCE_GRAD
                if action.microbatch != 0 or not gathered[stage]:
                    raise fail(f"{action}: a stage's gradients are reduced once per step, while "
                               "its weights are gathered", cell)
                reduced[stage] = position
        for stage in sorted(sharded):
            if gathered[stage]:
                raise fail(f"rank {rank} ends the step with stage {stage}'s weights gathered; "
                           f"end with RESHARD{stage}", None)
            if stage not in reduced:
                raise fail(f"rank {rank} never reduces stage {stage}'s gradients; put "
                           f"REDUCE_GRAD{stage}.0 after its last backward action", None)
            if stage not in last_compute:
                raise fail(f"rank {rank} gathers stage {stage} but runs none of its actions", None)
