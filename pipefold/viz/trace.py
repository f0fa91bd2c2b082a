"""Chrome / Perfetto trace export (the Trace Event JSON format).

One process per rank; its compute actions are complete ('X') events on thread 0
and its waits on thread 1, so a wait shows under the action it delayed. Times are
microseconds, as the format requires. Open the file in https://ui.perfetto.dev or
chrome://tracing.
"""

from __future__ import annotations

from typing import Any

from pipefold.timeline import Timeline

__all__ = ["to_chrome_trace"]

_COMPUTE_THREAD = 0
_WAIT_THREAD = 1
_MICROSECONDS = 1e6


def to_chrome_trace(timeline: Timeline) -> dict[str, Any]:
    """The trace as JSON-ready data: `{"traceEvents": [...], "displayTimeUnit": "ms", ...}`."""
    trace: list[dict[str, Any]] = []
    for rank in range(timeline.num_ranks):
        trace.append(
            {"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}}
        )
        trace.append(
            {"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "args": {"sort_index": rank}}
        )
        for tid, name in ((_COMPUTE_THREAD, "compute"), (_WAIT_THREAD, "wait")):
            trace.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": tid, "args": {"name": name}})
    for rank, row in enumerate(timeline.events):
        for event in row:
            action = event.action
            trace.append(
                {
                    "ph": "X",
                    "name": str(action),
                    "cat": action.op.value,
                    "pid": rank,
                    "tid": _COMPUTE_THREAD,
                    "ts": event.start * _MICROSECONDS,
                    "dur": event.duration * _MICROSECONDS,
                    "args": {
                        "stage": action.stage,
                        "microbatch": action.microbatch,
                        "op": action.op.value,
                        "step": event.step,
                    },
                }
            )
    for rank, waits in enumerate(timeline.waits):
        for wait in waits:
            trace.append(
                {
                    "ph": "X",
                    "name": f"wait {wait.waiting_for}",
                    "cat": "wait",
                    "pid": rank,
                    "tid": _WAIT_THREAD,
                    "ts": wait.start * _MICROSECONDS,
                    "dur": wait.duration * _MICROSECONDS,
                    "args": {"waiting_for": str(wait.waiting_for), "step": wait.step},
                }
            )
    return {
        "traceEvents": trace,
        "displayTimeUnit": "ms",
        "otherData": {"schedule": timeline.schedule_name, "source": timeline.source},
    }
