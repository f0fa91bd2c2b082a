"""The runtime: execute a lowered schedule across processes, exactly, and loudly on failure.

    >>> from pipefold.runtime import Pipeline   # also re-exported as pipefold.Pipeline

`Pipeline` (pipeline.py) owns the stages of this rank (stage.py) and runs each step
through the executor (executor.py), which dispatches every action of the rank's
lowered program to one handler. Transfers and collectives (comm.py) never wait
without a deadline (failure.py); activation memory is counted with saved-tensor
hooks (memory.py). `measured_cost_model` (measured.py) turns a measured timeline
into a `pipefold.simulate.CostModel`.
"""

from pipefold.runtime.measured import measured_cost_model
from pipefold.runtime.pipeline import Pipeline

__all__ = ["Pipeline", "measured_cost_model"]
