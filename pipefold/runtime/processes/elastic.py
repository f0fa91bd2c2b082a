"""torchrun's root cause: write torchelastic's error files so the culprit is listed first.

torchrun gives each rank an error file (`TORCHELASTIC_ERROR_FILE`) and, when ranks fail,
lists the failure with the smallest timestamp as the root cause; a rank killed by a signal
writes none, and torchrun then stamps it with the time it noticed, usually after the
surviving ranks wrote theirs. So `record_for_torchrun(error)`, called by a failing rank:

- writes this rank's error file in torchelastic's format (`ErrorHandler.record_exception`'s);
- when the error blames another rank (`PipelineError.failed_rank`) on this node that left no
  file (it was killed or stopped), writes that rank's file, naming what it was doing, stamped
  now; and stamps this rank's own one second later, as the consequence it is.

Outside torchrun (no `TORCHELASTIC_ERROR_FILE`) it does nothing. Standard library only.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

__all__ = ["ERROR_FILE_ENV", "record_for_torchrun"]

ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"


def _error_data(message: str, callstack: str, timestamp: int) -> dict[str, object]:
    # The layout torch.distributed.elastic.multiprocessing.errors.ErrorHandler writes and reads.
    extra = {"py_callstack": callstack, "timestamp": str(timestamp)}
    return {"message": {"message": message, "extraInfo": extra}}


def _int_env(name: str) -> int | None:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def _peer_error_file(own: Path, culprit: int) -> Path | None:
    """The error file torchrun gave world rank `culprit`, where it runs on this node.

    torchrun's layout is `<attempt dir>/<local rank>/error.json`; anything else is not guessed at.
    """
    rank, local_rank, local_size = _int_env("RANK"), _int_env("LOCAL_RANK"), _int_env("LOCAL_WORLD_SIZE")
    if rank is None or local_rank is None or local_size is None or own.parent.name != str(local_rank):
        return None
    peer_local = culprit - (rank - local_rank)
    if not 0 <= peer_local < local_size:
        return None  # on another node: its own agent reports it
    return own.parent.parent / str(peer_local) / own.name


def _write(path: Path, data: dict[str, object], *, exclusive: bool = False) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        with os.fdopen(os.open(path, flags, 0o644), "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        return True
    except OSError:  # exists (exclusive: another rank wrote it first) or cannot be written
        return False


def record_for_torchrun(error: BaseException) -> None:
    """Write torchelastic's error file(s) for `error`, raised on this rank (see the module docstring)."""
    own = os.environ.get(ERROR_FILE_ENV)
    if not own:
        return
    own_path = Path(own)
    now = int(time.time())
    stamp = now
    rank = _int_env("RANK")
    culprit = getattr(error, "failed_rank", None)
    message = f"{type(error).__name__}: {error}"
    if isinstance(culprit, int) and rank is not None and culprit != rank:
        peer = _peer_error_file(own_path, culprit)
        if peer is not None and not peer.exists():
            note = f"rank {culprit} failed (reported by rank {rank}, which noticed it): {error}"
            _write(peer, _error_data(note, "", now), exclusive=True)
        # Torchrun lists the earliest failure first; this rank's is the consequence.
        stamp = now + 1
    callstack = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    _write(own_path, _error_data(message, callstack, stamp))
