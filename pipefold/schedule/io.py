"""Schedules to and from files: pipefold's JSON, and torch.distributed.pipelining's CSV.

JSON is the lossless format (name, placement, weight update, every action as its
short string). The CSV bridge speaks torch's compute-only action format so a
schedule can be handed to `_PipelineScheduleRuntime._load_csv`, or one of torch's
dumped with `_dump_csv` read back and compared: one row per rank, one cell per
step, cells like `0F1` (stage 0 forward of micro-batch 1), `1B0` (full backward),
`0I0` (input-gradient backward), `0W0` (weight-gradient backward); an empty cell
is an idle step. No torch import.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate
from pipefold.schedule.validate import validate

__all__ = ["FORMAT", "VERSION", "to_json", "from_json", "dumps", "load", "to_torch_csv", "from_torch_csv"]

FORMAT = "pipefold.schedule"
"""The `format` field of every JSON schedule, so a stray JSON file is refused by name."""
VERSION = 1

_TORCH_CELL = re.compile(r"^(?P<stage>\d+)(?P<op>[FBIW])(?P<microbatch>\d+)$")
# torch's DualPipeV writes an overlapped forward/backward pair as "(0F1;1B0)OVERLAP_F_B".
_TORCH_SHARDING = re.compile(r"^(?P<stage>\d+)(?P<op>UNSHARD|RESHARD|REDUCE_GRAD)$")
"""torch's sharding cells carry no micro-batch ("0UNSHARD"); pipefold numbers them per stage."""
_TORCH_OVERLAP = re.compile(r"^\((?P<inner>[^()]*)\)OVERLAP_F_B$")


def to_json(schedule: Schedule) -> dict[str, Any]:
    """A JSON-ready dict holding everything needed to rebuild `schedule` exactly."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": schedule.name,
        "num_ranks": schedule.num_ranks,
        "num_stages": schedule.num_stages,
        "num_microbatches": schedule.num_microbatches,
        "placement": list(schedule.placement),
        "weight_update": schedule.weight_update.value,
        "actions": [[str(action) for action in row] for row in schedule.actions],
    }


def _field(data: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in data:
        raise ScheduleError(f"schedule JSON has no {key!r} field; write it with pipefold.schedule.io.to_json")
    value = data[key]
    # bool is an int subclass; a count given as true/false is a mistake, not a 1/0.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ScheduleError(
            f"schedule JSON field {key!r} must be {kind.__name__}; got {type(value).__name__} {value!r}"
        )
    return value


def _int_list(values: list[Any], key: str) -> tuple[int, ...]:
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ScheduleError(f"schedule JSON field {key!r} must hold integers; got {value!r}")
    return tuple(values)


def from_json(data: Mapping[str, Any], *, check: bool = True) -> Schedule:
    """Rebuild a schedule written by `to_json`; with `check`, also `validate` it."""
    if data.get("format") != FORMAT:
        raise ScheduleError(
            f"not a pipefold schedule: 'format' is {data.get('format')!r}, expected {FORMAT!r}"
        )
    version = _field(data, "version", int)
    if version != VERSION:
        raise ScheduleError(f"schedule JSON 'version' is {version}; this pipefold reads version {VERSION}")
    raw_update = _field(data, "weight_update", str)
    try:
        weight_update = WeightUpdate(raw_update)
    except ValueError:
        known = ", ".join(w.value for w in WeightUpdate)
        raise ScheduleError(f"schedule JSON 'weight_update' is {raw_update!r}; use one of {known}") from None
    rows = _field(data, "actions", list)
    actions = []
    for rank, row in enumerate(rows):
        if not isinstance(row, list) or not all(isinstance(cell, str) for cell in row):
            raise ScheduleError(f"schedule JSON 'actions'[{rank}] must be a list of strings like 'F0.1'")
        actions.append(tuple(Action.parse(cell) for cell in row))
    schedule = Schedule(
        name=_field(data, "name", str),
        num_ranks=_field(data, "num_ranks", int),
        num_stages=_field(data, "num_stages", int),
        num_microbatches=_field(data, "num_microbatches", int),
        placement=_int_list(_field(data, "placement", list), "placement"),
        actions=tuple(actions),
        weight_update=weight_update,
    )
    if check:
        validate(schedule)
    return schedule


def dumps(schedule: Schedule) -> str:
    """`schedule` as the JSON text `load` reads (write it with `pipefold.files.write_atomic`)."""
    return json.dumps(to_json(schedule), indent=1) + "\n"


def load(path: str | os.PathLike[str], *, check: bool = True) -> Schedule:
    """Read a schedule written by `save`; with `check`, also `validate` it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ScheduleError(
            f"{path}: not valid JSON ({error}); write schedules with pipefold.schedule.io.dumps"
        ) from None
    if not isinstance(data, dict):
        raise ScheduleError(f"{path}: a schedule file holds a JSON object; got {type(data).__name__}")
    return from_json(data, check=check)


def _torch_cell(action: Action) -> str:
    if action.op.is_sharding:
        return f"{action.stage}{action.op.value}"
    return f"{action.stage}{action.op.value}{action.microbatch}"


def to_torch_csv(schedule: Schedule) -> str:
    """torch's compute-only CSV: one row per rank, one cell per action, in order.

    Rows are not padded to equal length (torch's `_dump_csv` does not either).
    Asynchronous schedules are refused: torch's format has no optimizer-step action.
    """
    if schedule.weight_update is not WeightUpdate.FLUSH:
        raise ScheduleError(
            f"{schedule.name}: weight_update={schedule.weight_update.value} needs STEP actions, "
            "which torch's CSV format cannot express; export it with to_json instead"
        )
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in schedule.actions:
        writer.writerow(_torch_cell(action) for action in row)
    return buffer.getvalue()


def _parse_torch_cell(cell: str, rank: int, column: int) -> list[Action]:
    text = cell.strip()
    if not text:
        return []
    overlap = _TORCH_OVERLAP.match(text)
    if overlap is not None:
        # An overlapped pair runs its parts in the order written: forward, then backward.
        parts = [part for part in overlap["inner"].split(";") if part.strip()]
        return [action for part in parts for action in _parse_torch_cell(part, rank, column)]
    sharding = _TORCH_SHARDING.match(text)
    if sharding is not None:  # numbered per stage by from_torch_csv
        return [Action(Op(sharding["op"]), int(sharding["stage"]), 0)]
    match = _TORCH_CELL.match(text)
    if match is None:
        raise ScheduleError(
            f"torch CSV row {rank} (rank {rank}), column {column}: cannot read {cell!r}; expected a "
            "compute action STAGE OP MICROBATCH with OP one of F, B, I, W (e.g. '0F1'), or an empty "
            "cell. Communication cells (SEND_F, RECV_B, …) belong to torch's compute_comms format; "
            "drop them first"
        )
    return [Action(Op(match["op"]), int(match["stage"]), int(match["microbatch"]))]


def _number_sharding(row: list[Action]) -> list[Action]:
    """Number each stage's UNSHARD / RESHARD / REDUCE_GRAD 0, 1, ... in row order."""
    counts: dict[tuple[Op, int], int] = {}
    numbered = []
    for action in row:
        if action.op.is_sharding:
            key = (action.op, action.stage)
            action = Action(action.op, action.stage, counts.get(key, 0))
            counts[key] = action.microbatch + 1
        numbered.append(action)
    return numbered


def from_torch_csv(text: str, *, num_ranks: int | None = None, name: str = "torch-csv") -> Schedule:
    """Read torch's compute-only CSV; placement is inferred from the row holding each stage.

    `num_ranks` defaults to the number of rows; a larger value adds idle ranks.
    The result is validated.
    """
    rows = [
        [action for column, cell in enumerate(row) for action in _parse_torch_cell(cell, rank, column)]
        for rank, row in enumerate(csv.reader(io.StringIO(text)))
    ]
    if num_ranks is None:
        num_ranks = len(rows)
    if num_ranks < len(rows):
        raise ScheduleError(
            f"torch CSV has {len(rows)} rank rows but num_ranks={num_ranks}; "
            f"pass num_ranks >= {len(rows)} or leave it out"
        )
    rows += [[] for _ in range(num_ranks - len(rows))]
    rows = [_number_sharding(row) for row in rows]
    owner: dict[int, int] = {}
    for rank, row in enumerate(rows):
        for action in row:
            first = owner.setdefault(action.stage, rank)
            if first != rank:
                raise ScheduleError(
                    f"torch CSV: stage {action.stage} appears on rank {first} and rank {rank}; "
                    "each stage must live on exactly one rank row"
                )
    if not owner:
        raise ScheduleError("torch CSV holds no compute actions; expected cells like '0F0'")
    num_stages = max(owner) + 1
    missing = [stage for stage in range(num_stages) if stage not in owner]
    if missing:
        raise ScheduleError(
            f"torch CSV: stages {missing} have no actions, so their rank is unknown; "
            f"every stage 0..{num_stages - 1} needs at least its forwards"
        )
    schedule = Schedule(
        name=name,
        num_ranks=num_ranks,
        num_stages=num_stages,
        num_microbatches=max(a.microbatch for row in rows for a in row if not a.op.is_sharding) + 1,
        placement=tuple(owner[stage] for stage in range(num_stages)),
        actions=tuple(tuple(row) for row in rows),
    )
    validate(schedule)
    return schedule
