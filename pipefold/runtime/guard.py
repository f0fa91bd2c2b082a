"""A pipeline's failure state: the first failure of a step, a streaming run, an evaluation or a
phase (optimizer step, checkpoint save) is published to the other ranks, and the pipeline then
refuses to run again, since its communication state is undefined after a failure.

    guard = FailureGuard(rank, board, progress, watchdog, report)
    loss = guard.run(lambda: one_step())      # a failure here is published and re-raised
    with guard.phase("optimizer step"):       # a peer's death in here is named as such
        optimizer.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from pipefold.errors import NonFiniteLoss, PeerFailure, PipefoldError, PipelineError
from pipefold.runtime.failure import FailureBoard, FailureReport, Watchdog
from pipefold.runtime.progress import Progress

__all__ = ["FailureGuard"]

Result = TypeVar("Result")


class FailureGuard:
    """Runs a pipeline's steps so that a failure reaches every rank and breaks the pipeline."""

    def __init__(
        self,
        rank: int,
        board: FailureBoard,
        progress: Progress,
        watchdog: Watchdog,
        report: Callable[[BaseException], FailureReport],
    ) -> None:
        self._rank = rank
        self._board = board
        self._progress = progress
        self._watchdog = watchdog
        self._report = report
        self.broken: str | None = None
        """What broke the pipeline (None while it works)."""

    def check(self) -> None:
        if self.broken is not None:
            raise PipelineError(
                f"rank {self._rank}: this pipeline stopped after a failure ({self.broken}); "
                "its communication state is undefined, so build a new Pipeline (and process group)"
            )

    def run(self, run: Callable[[], Result]) -> Result:
        """Run one step or streaming run; a failure is reported to the other ranks."""
        self.check()
        try:
            self._progress.mark("step setup")
            return run()
        except NonFiniteLoss:
            raise  # every rank raises it alike after agreeing on the losses: nothing to report
        except PeerFailure as error:
            self.broken = str(error)
            self._progress.mark("failed")
            raise
        except BaseException as error:
            self.broken = f"{type(error).__name__}: {error}"
            self._progress.mark("failed")
            report = self._report(error)
            self._board.publish(report)
            if isinstance(error, PipelineError) and error.failed_rank is None:
                error.failed_rank = report.culprit
            if isinstance(error, PipefoldError) or not isinstance(error, Exception):
                raise
            raise PipelineError(str(report), failed_rank=report.culprit) from error

    def contain(self, run: Callable[[], Result]) -> Result:
        """Run a forward-only pass: a failure breaks the pipeline and is published, unwrapped."""
        self.check()
        try:
            return run()
        except PeerFailure as error:
            self.broken = str(error)
            raise
        except BaseException as error:
            self.broken = f"{type(error).__name__}: {error}"
            self._board.publish(self._report(error))
            raise

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Mark this rank as in phase `name` while the block runs (see `Pipeline.phase`)."""
        self._progress.mark(name)
        try:
            yield
        except PeerFailure:
            self._progress.mark("failed")
            raise
        except BaseException as error:
            self._progress.mark("failed")
            explained = self._watchdog.explain(error, name) if isinstance(error, Exception) else None
            if explained is not None:
                self.broken = str(explained)
                raise explained from error
            raise
        self._progress.mark("")
