"""What a send costs its sender, read off measured timelines: a rank's gap before its next action
(less its waits) after an action whose output went to another rank, against after the others.

    gaps = measured_send_gaps(timelines, schedule)   # {"sent_s": ..., "kept_s": ..., "num_sent": ...}

`pipefold plan --profile`'s calibration records it per block (`pipefold.job.calibration`) and fits
`ModelCosts.send_overhead_s` and `send_s_per_byte` from it (`pipefold.plan.send_fit`): the simulator
then charges each crossing action's send apart from the runtime's time per action, which the
timelines' mean gap (`measured_action_overhead`) spreads over every action alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipefold.runtime.measured import action_gaps, trimmed_mean
from pipefold.schedule import Schedule
from pipefold.simulate.costs import sent_boundary
from pipefold.timeline import Timeline

__all__ = ["measured_send_gaps"]


def measured_send_gaps(timelines: Sequence[Timeline], schedule: Schedule) -> dict[str, float | int]:
    """The mean gap between consecutive compute actions of a rank in one step, up to the next
    action's start or the start of its wait, after an action whose output crosses to another rank
    (`sent_s`, over `num_sent` gaps: `pipefold.simulate.costs.sent_boundary`) and after the others
    (`kept_s`, over `num_kept`); each without its largest 5%; 0 where none."""
    sent: list[float] = []
    kept: list[float] = []
    for action, gap in action_gaps(timelines):
        (sent if sent_boundary(action, schedule.placement) >= 0 else kept).append(gap)
    return {"sent_s": trimmed_mean(sent), "kept_s": trimmed_mean(kept), "num_sent": len(sent),
            "num_kept": len(kept)}
