"""Worker pools shared by the runtime tests: ranks start once per module (torch import costs seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _workers import WorkerPool  # noqa: E402


@pytest.fixture(scope="module")
def pool1():
    pool = WorkerPool(1)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool2():
    pool = WorkerPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool4():
    pool = WorkerPool(4)
    yield pool
    pool.close()
