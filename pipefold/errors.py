"""The one small hierarchy of errors that pipefold raises for user mistakes.

Every message names the offending field or value and says how to fix it, so a
user never has to read a traceback to learn what went wrong.
"""

from __future__ import annotations

__all__ = [
    "PipefoldError",
    "ConfigError",
    "CheckpointError",
    "ScheduleError",
    "CostModelError",
    "PartitionError",
    "PipelineError",
    "PeerFailure",
    "BoundaryMismatch",
    "NonFiniteLoss",
]


class PipefoldError(Exception):
    """Base class of every error pipefold raises on purpose."""


class ConfigError(PipefoldError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class CheckpointError(ConfigError):
    """A checkpoint on disk is missing, damaged, refused as unsafe, or does not fit the model;
    the message names the file and what to do."""


class ScheduleError(PipefoldError, ValueError):
    """A schedule cannot be built with these parameters, or is not valid."""


class CostModelError(PipefoldError, ValueError):
    """A cost model does not match the schedule, or holds impossible values."""


class PartitionError(PipefoldError, ValueError):
    """A model cannot be cut into the requested stages."""


class PipelineError(PipefoldError, RuntimeError):
    """A pipeline failed while running; the message names rank, stage, micro-batch and action.

    `failed_rank` is the world rank at the root of the failure where it is known (a rank that
    raised, or the one a stuck pipeline waits on): the launcher names it in its final message.
    """

    def __init__(self, message: str = "", *, failed_rank: int | None = None) -> None:
        super().__init__(message)
        self.failed_rank = failed_rank


class PeerFailure(PipelineError):
    """Another rank failed or stopped answering; this rank stops instead of hanging."""


class BoundaryMismatch(PipelineError):
    """A tensor crossing a stage boundary has a shape or dtype the other side did not expect."""


class NonFiniteLoss(PipelineError):
    """The loss of a micro-batch is NaN or infinite."""
