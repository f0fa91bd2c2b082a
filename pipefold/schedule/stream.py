"""Streaming (asynchronous) runs: the steady state of PipeDream and PipeDream-2BW as data.

A flush schedule is one call: warm-up, steady state, drain, and the caller steps. An
asynchronous schedule can instead run many optimizer steps back to back without draining:
step k+1's forwards enter while step k's backwards drain. A `Stream` says how, per rank:

- `warmup`: the forwards that fill the pipeline once, at the start of the run;
- `steady`: one step's actions, repeated for every step with its micro-batch indices shifted
  by k·m (a forward may name a later step's micro-batch: index >= m);
- the cool-down is what the last step's steady list leaves once the forwards past the run's
  end are dropped (`cooldown(num_steps)`).

`unroll(num_steps)` turns it into an ordinary `Schedule` over num_steps·m micro-batches
(global index k·m + j), which `validate`, `simulate`, `lower` and the runtime take as is:

    >>> s = stream("pipedream", num_ranks=2, num_microbatches=2)
    >>> print(s.unroll(2))   # rank 0: F0.0 | F0.1 B0.0 STEP0.0 F0.2 B0.1 STEP0.1 | ...

`version_lag` is the weight-version rule a forward follows (the runtime's stash applies it):
0 (PipeDream) runs on the stage's newest weights; 1 (PipeDream-2BW) runs every micro-batch
of step k on the weights after k-1 updates, so each update applies a gradient one step
stale, W(k+1) = W(k) - lr * grad(W(k-1)), as in the paper.

Design notes: docs/decisions.md, "streaming runs".
"""

from __future__ import annotations

from dataclasses import dataclass

from pipefold.errors import ScheduleError
from pipefold.schedule.ir import Action, Op, Schedule, WeightUpdate, contiguous_placement

__all__ = ["STREAMING_FAMILIES", "Stream", "stream"]

STREAMING_FAMILIES = ("pipedream", "pipedream-2bw")
"""The families that can stream: they update weights inside the schedule."""


@dataclass(frozen=True)
class Stream:
    """Per rank: the warm-up, one step's repeating actions; see the module docstring."""

    name: str
    num_ranks: int
    num_microbatches: int
    """Micro-batches per step (m)."""
    placement: tuple[int, ...]
    warmup: tuple[tuple[Action, ...], ...]
    """Absolute micro-batch indices (they all belong to the first step or the ones after)."""
    steady: tuple[tuple[Action, ...], ...]
    """Relative indices: micro-batch j of step k is k·m + j; STEP i of step k is k·u + i
    (u = `updates_per_step`)."""
    weight_update: WeightUpdate
    version_lag: int
    """0: a forward uses the newest weights; n: a forward of step k uses those after k-n updates."""

    @property
    def updates_per_step(self) -> int:
        """STEPs of each stage per step (m for PipeDream, 1 for PipeDream-2BW)."""
        return sum(1 for action in self.steady[0] if action.op is Op.STEP)

    def _rows(self, num_steps: int) -> list[list[Action]]:
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ScheduleError(f"num_steps = {num_steps!r}; give an integer >= 1")
        m, u = self.num_microbatches, self.updates_per_step
        total = num_steps * m
        rows = []
        for warmup, steady in zip(self.warmup, self.steady, strict=True):
            row = [a for a in warmup if a.microbatch < total]
            for k in range(num_steps):
                for a in steady:
                    shifted = a.microbatch + (k * u if a.op is Op.STEP else k * m)
                    if a.op is not Op.STEP and shifted >= total:
                        continue  # the forward of a step past the run's end: the cool-down
                    row.append(Action(a.op, a.stage, shifted))
            rows.append(row)
        return rows

    def unroll(self, num_steps: int) -> Schedule:
        """The whole run as one `Schedule` of num_steps·m micro-batches."""
        rows = self._rows(num_steps)
        return Schedule(
            name=self.name,
            num_ranks=self.num_ranks,
            num_stages=len(self.placement),
            num_microbatches=num_steps * self.num_microbatches,
            placement=self.placement,
            actions=tuple(tuple(row) for row in rows),
            weight_update=self.weight_update,
        )

    def cooldown(self, num_steps: int) -> tuple[tuple[Action, ...], ...]:
        """Per rank, the actions after the run's last forward: the drain, paid once per run."""
        result = []
        for row in self._rows(num_steps):
            last_forward = max((i for i, a in enumerate(row) if a.op is Op.F), default=-1)
            result.append(tuple(row[last_forward + 1 :]))
        return tuple(result)


def stream(name: str, *, num_ranks: int, num_microbatches: int) -> Stream:
    """The streaming form of `pipedream` or `pipedream-2bw` for p ranks and m micro-batches a step.

    Rank r runs 1F1B over the whole run: w = p-1-r warm-up forwards, then one forward and
    one backward in turn, so micro-batches of step k+1 enter while step k's drain. PipeDream
    steps the stage after every backward; 2BW after the last backward of each step (one
    update per m micro-batches), which needs m >= p-1: the forwards of step k+2 (on the
    weights that update makes) must not start before it.
    """
    if name not in STREAMING_FAMILIES:
        raise ScheduleError(
            f"schedule {name!r} cannot stream: a streaming run overlaps optimizer steps, which only "
            f"the asynchronous schedules {', '.join(STREAMING_FAMILIES)} do (a flush schedule drains "
            "before every update); use one of them, or call step() once per batch"
        )
    p, m = num_ranks, num_microbatches
    if p < 1 or m < 1:
        raise ScheduleError(f"num_ranks and num_microbatches must be >= 1; got {p} and {m}")
    double_buffer = name == "pipedream-2bw"
    if double_buffer and m < p - 1:
        raise ScheduleError(
            f"pipedream-2bw streaming with num_microbatches={m} on {p} ranks: rank 0 would start "
            f"step k+2 before step k's update exists; use num_microbatches >= {p - 1} (the paper "
            "takes m >= p)"
        )
    warmup, steady = [], []
    for rank in range(p):
        stage, lead = rank, p - 1 - rank
        warmup.append(tuple(Action(Op.F, stage, j) for j in range(lead)))
        row: list[Action] = []
        for j in range(m):
            row.append(Action(Op.F, stage, j + lead))
            row.append(Action(Op.B, stage, j))
            if not double_buffer:
                row.append(Action(Op.STEP, stage, j))
        if double_buffer:
            row.append(Action(Op.STEP, stage, 0))
        steady.append(tuple(row))
    return Stream(
        name=name,
        num_ranks=p,
        num_microbatches=m,
        placement=contiguous_placement(p),
        warmup=tuple(warmup),
        steady=tuple(steady),
        weight_update=WeightUpdate.DOUBLE_BUFFER if double_buffer else WeightUpdate.STASH,
        version_lag=1 if double_buffer else 0,
    )
