"""Full sharding in the schedule: where each stage's weights are gathered (`UNSHARD`), its
gradients reduce-scattered over the data-parallel replicas (`REDUCE_GRAD`) and its gathered
weights freed (`RESHARD`).

    sharded = add_sharding(schedule)                      # gather once per stage per step
    sharded = add_sharding(schedule, free_between=True)   # free while the rank's other stages run
    sharded = add_sharding(schedule, lookahead=2)         # start each gather 2 actions early
    program = lower(sharded)                              # what the runtime runs
    timeline = simulate(sharded, costs)                   # prices CostModel.gather / .reduce_scatter

Every data-parallel replica of a pipeline rank runs the same row, so the replicas issue the
same collectives in the same order. Why these places: docs/parallelism.md, "Full sharding".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace

from pipefold.errors import ConfigError, ScheduleError
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate, format_grid

__all__ = ["add_sharding", "check_sharding", "gather_waits", "gathers_per_step", "is_sharded", "strip_sharding"]

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
    rows = []
    for row in schedule.actions:
        before: dict[int, list[Action]] = defaultdict(list)
        after: dict[int, list[Action]] = defaultdict(list)
        positions: dict[int, list[int]] = defaultdict(list)
        for position, action in enumerate(row):
            if action.op in _WEIGHT_OPS and action.stage in wanted:
                positions[action.stage].append(position)
        for stage in sorted(positions):
            runs = _runs(positions[stage], free_between, lookahead)
            for k, (start, end) in enumerate(runs):
                before[max(start - lookahead, 0)].append(Action(Op.UNSHARD, stage, k))
                if k == len(runs) - 1:
                    after[end].append(Action(Op.REDUCE_GRAD, stage, 0))
                after[end].append(Action(Op.RESHARD, stage, k))
        sharded: list[Action] = []
        for position, action in enumerate(row):
            sharded.extend(before.get(position, ()))
            sharded.append(action)
            sharded.extend(after.get(position, ()))
        rows.append(tuple(sharded))
    suffix = "+shard" + ("-free" if free_between else "") + (f"-ahead{lookahead}" if lookahead else "")
    return replace(schedule, name=f"{schedule.name}{suffix}", actions=tuple(rows))


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


def gathers_per_step(schedule: Schedule) -> dict[int, int]:
    """{stage: weight gathers (UNSHARD) one step runs}, for the stages the schedule shards."""
    counts: dict[int, int] = defaultdict(int)
    for row in schedule.actions:
        for action in row:
            if action.op is Op.UNSHARD:
                counts[action.stage] += 1
    return dict(counts)


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
