"""Costs and the discrete-event simulator. No torch import.

    >>> from pipefold.schedule import build
    >>> from pipefold.simulate import CostModel, simulate
    >>> schedule = build("gpipe", num_ranks=4, num_microbatches=8)
    >>> round(simulate(schedule, CostModel.uniform(4)).bubble_fraction, 4)  # (p-1)/(m+p-1)
    0.2727
"""

from pipefold.errors import CostModelError
from pipefold.simulate.costs import CostModel, Link
from pipefold.simulate.engine import predicted_step_time, simulate, step_end_time
from pipefold.simulate.memory import activation_bytes_peak, weight_versions

__all__ = [
    "CostModel",
    "CostModelError",
    "Link",
    "activation_bytes_peak",
    "predicted_step_time",
    "simulate",
    "step_end_time",
    "weight_versions",
]
