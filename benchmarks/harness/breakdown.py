"""Where a configuration's pipeline efficiency goes, from pipefold's own measured timeline.

    parts = efficiency_breakdown(record)     # None where the record has no timeline

Efficiency = t(one process) / (ranks x t(step)) factors exactly into four ratios, each at
most about 1, read off the last timed step's `Timeline` (the step time is the median):

- *inflation* = t(one process) / sum of every rank's action durations: how much slower
  the same forward and backward work runs inside the pipeline (ranks competing for the
  cores' shared caches and memory, a split backward's extra cost, waits that slow the next
  action) - or faster, above 1;
- *balance* = sum of the action durations / (ranks x the busiest rank's): the stage layout;
- *busy* = the busiest rank's action time / the timeline's span: its bubble and waits;
- *span / step* = the timeline's span / the median step: the runtime's time outside the
  actions (the step's start and end exchanges) and the last step's distance from the median.

No torch import.
"""

from __future__ import annotations

from typing import Any

__all__ = ["efficiency_breakdown"]


def efficiency_breakdown(record: dict[str, Any]) -> dict[str, float] | None:
    """{"efficiency", "inflation", "balance", "busy", "span_per_step"} of one results record."""
    timeline = (record.get("sides", {}).get("pipefold") or {}).get("timeline")
    single, step = record.get("single_process_s"), record.get("pipefold_step_s")
    num_ranks = record.get("ranks")
    if not timeline or not single or not step or not num_ranks:
        return None
    # Timeline JSON events: [action, start, end, ...] per rank, on one clock.
    rows = timeline["events"]
    compute = [sum(event[2] - event[1] for event in row) for row in rows]
    starts = [event[1] for row in rows for event in row]
    ends = [event[2] for row in rows for event in row]
    if not starts or min(compute) <= 0:
        return None
    span = max(ends) - min(starts)
    total = sum(compute)
    return {
        "efficiency": single / (num_ranks * step),
        "inflation": single / total,
        "balance": total / (num_ranks * max(compute)),
        "busy": max(compute) / span,
        "span_per_step": span / step,
    }
