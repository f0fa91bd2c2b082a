"""pipefold: pipeline-parallel training for PyTorch.

Schedules are data (`pipefold.schedule`), predicted by a simulator
(`pipefold.simulate`) and executed by a runtime (`pipefold.Pipeline`) whose
measured `Timeline` is the simulator's own type.

The torch-free parts import without torch; `Pipeline` and the model helpers
load torch on first use, so `pipefold schedules` starts instantly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipefold._version import __version__
from pipefold.errors import (
    ConfigError,
    PartitionError,
    PeerFailure,
    PipefoldError,
    PipelineError,
    ScheduleError,
)
from pipefold.timeline import Event, Timeline, Wait

if TYPE_CHECKING:
    from pipefold.model import LayerSpec, TiedLayerSpec, split
    from pipefold.runtime import (
        CheckpointInfo,
        LayoutOptions,
        Microbatches,
        ParallelOptions,
        Pipeline,
        RuntimeOptions,
        TransportOptions,
        load_checkpoint,
        save_checkpoint,
    )

__all__ = [
    "CheckpointInfo",
    "ConfigError",
    "Event",
    "LayerSpec",
    "LayoutOptions",
    "Microbatches",
    "ParallelOptions",
    "PartitionError",
    "PeerFailure",
    "Pipeline",
    "PipefoldError",
    "PipelineError",
    "RuntimeOptions",
    "ScheduleError",
    "TiedLayerSpec",
    "Timeline",
    "TransportOptions",
    "Wait",
    "__version__",
    "load_checkpoint",
    "save_checkpoint",
    "split",
]

_LAZY = {
    "Pipeline": "pipefold.runtime",
    "LayoutOptions": "pipefold.runtime",
    "Microbatches": "pipefold.runtime",
    "ParallelOptions": "pipefold.runtime",
    "RuntimeOptions": "pipefold.runtime",
    "TransportOptions": "pipefold.runtime",
    "CheckpointInfo": "pipefold.runtime",
    "save_checkpoint": "pipefold.runtime",
    "load_checkpoint": "pipefold.runtime",
    "LayerSpec": "pipefold.model",
    "TiedLayerSpec": "pipefold.model",
    "split": "pipefold.model",
}


def __getattr__(name: str) -> Any:
    # Deferred so that importing pipefold does not import torch (1-3 s) for torch-free tools.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipefold' has no attribute {name!r}")
