"""Session-wide test setup: the fork server that ranks start from.

A session that collected multi-process tests starts the fork server (tests/runtime/_workers.py,
`rank_context`) as soon as collection ends, so that it imports torch in the background while the
first tests run, and so that every rank of the session (the worker pools', `pipefold train`'s,
the fault suite's) forks from one server that already imported what a rank's first step needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_RUNTIME_TESTS = Path(__file__).resolve().parent / "runtime"


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("multiprocess") for item in session.items):
        return
    if str(_RUNTIME_TESTS) not in sys.path:
        sys.path.insert(0, str(_RUNTIME_TESTS))
    from _workers import rank_context  # noqa: PLC0415

    rank_context()
