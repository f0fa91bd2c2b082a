"""pipefold's one C++ extension: the split backward's steady-state graph walk (`graph_walk.cpp`).

`backward_input` keys its cached plan by walking the stage's autograd graph every micro-batch
(`backward_plan.graph_shape`); in Python, most of that walk is creating the nodes' Python
objects. `GraphWalk.match` walks the graph in C++ over `Node::next_edges()` and compares it
with a signature `GraphWalk.record` took from the last graph the Python walk planned, handing
back only the nodes the plan indexes; on any mismatch the Python walk runs as before.

Built once per machine, torch and Python version and source (`build`, called by `scripts/setup`,
by `pipefold train`'s launcher where the schedule splits its backward, and by
`python -m pipefold.runtime.native`) into `PIPEFOLD_NATIVE_DIR` (default
`~/.cache/pipefold/native`), under a file lock so concurrent launches build it once. A rank only
loads what is built (`load`): it never builds, stalls or fails; where nothing is built (no
compiler, a failed build) it uses the Python walk, with the same results. `PIPEFOLD_PYTHON_WALK=1`
forces the Python walk. Design note: docs/decisions.md, "The split backward's steady-state graph walk
is C++".
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import Tensor
from torch.autograd.graph import Node

from pipefold.schedule.ir import Op

if TYPE_CHECKING:
    from pipefold.schedule.ir import Schedule

__all__ = ["FORCE_PYTHON_ENV", "NATIVE_DIR_ENV", "GraphWalk", "MatchFn", "RecordFn", "build", "build_dir",
           "build_for", "load"]

FORCE_PYTHON_ENV = "PIPEFOLD_PYTHON_WALK"
"""Set to 1: `load` gives None, so the split backward walks its graphs in Python."""
NATIVE_DIR_ENV = "PIPEFOLD_NATIVE_DIR"
"""Where built extensions are kept (default ~/.cache/pipefold/native)."""

_NAME = "pipefold_graph_walk"
_SOURCE = Path(__file__).with_name("graph_walk.cpp")
_FAILED = "build-failed.txt"
logger = logging.getLogger(__name__)


RecordFn = Callable[[Sequence[Tensor], Sequence[Tensor], tuple[Tensor, ...], tuple[int, ...]], object]
"""`GraphWalk.record`'s type."""
MatchFn = Callable[[object, Sequence[Tensor], Sequence[Tensor], Sequence[Tensor]], list[Node | None] | None]
"""`GraphWalk.match`'s type."""


class GraphWalk(NamedTuple):
    """The extension's two functions, typed (the module itself is untyped)."""

    record: RecordFn
    """record(roots, inputs, params, wanted): the graph's signature, or None where the walk does
    not handle it; `match` later hands back the nodes at the walk indices `wanted`."""
    match: MatchFn
    """match(signature, roots, inputs, params): the wanted nodes of this graph where it has the
    recorded graph's shape (so `graph_shape` would key it alike) and `params` is the recorded
    tuple, else None."""


def build_dir() -> Path:
    """This source's build for this torch and Python: a new source or torch gets a new folder."""
    root = os.environ.get(NATIVE_DIR_ENV) or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipefold" / "native"
    )
    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
    version = f"{sys.version_info[0]}{sys.version_info[1]}"
    return Path(root) / f"{_NAME}-torch{torch.__version__}-py{version}-{digest}"


def build() -> Path | None:
    """Build the extension unless it is built (or its build failed before): the built file, or
    None where it cannot be built (logged once per build folder). Never raises. Concurrent
    callers, in one process or many, wait for one build under a file lock."""
    try:
        import fcntl  # POSIX only: elsewhere the except below logs it and the Python walk runs

        where = build_dir()
        target = where / f"{_NAME}.so"
        if target.exists():
            return target
        if (where / _FAILED).exists():
            return None
        where.mkdir(parents=True, exist_ok=True)
        with open(where.parent / f".{where.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.exists():  # built by whoever held the lock
                return target
            if (where / _FAILED).exists():
                return None
            return _compile(where, target)
    except Exception as error:  # a cache folder we cannot write, a lock we cannot take
        logger.warning(
            "pipefold: the C++ graph walk cannot be built (%s); the Python walk runs instead", error
        )
        return None


def build_for(schedule: Schedule) -> None:
    """`build` before a launch whose schedule splits its backward (an `I` action): its ranks
    then load the C++ walk; other schedules' ranks never walk a graph."""
    if any(action.op is Op.I for _, _, action in schedule.iter_actions()):
        build()


def _compile(where: Path, target: Path) -> Path | None:
    """Compile into where/build and move the library to `target` in one rename, so a rank that
    loads it never sees half a file."""
    start = time.monotonic()
    try:
        from torch.utils.cpp_extension import load as jit_load  # imports setuptools: not in ranks

        scratch = where / "build"
        scratch.mkdir(exist_ok=True)
        jit_load(
            name=_NAME,
            sources=[str(_SOURCE)],
            build_directory=str(scratch),
            extra_cflags=["-O2"],
            is_python_module=True,
            verbose=False,
        )
        os.replace(scratch / f"{_NAME}.so", target)
    except Exception as error:  # no compiler, missing headers, a compile error
        (where / _FAILED).write_text(f"{type(error).__name__}: {error}\n")
        logger.warning(
            "pipefold: building the C++ graph walk failed (%s; details in %s); the Python walk runs "
            "instead, with the same results",
            str(error).splitlines()[0] if str(error) else type(error).__name__, where / _FAILED,
        )
        return None
    logger.info("pipefold: built the C++ graph walk in %.1f s (%s)", time.monotonic() - start, target)
    return target


_loaded: list[GraphWalk | None] = []
"""`load`'s answer once found: [walk] (or [None])."""


def load() -> GraphWalk | None:
    """The built extension's functions, or None: where `PIPEFOLD_PYTHON_WALK=1`, where nothing is
    built (run `build`) or where it does not load (logged once). Never builds, never raises."""
    if _loaded:
        return _loaded[0]
    walk: GraphWalk | None = None
    if os.environ.get(FORCE_PYTHON_ENV, "") not in ("", "0"):
        _loaded.append(None)
        return None
    try:
        target = build_dir() / f"{_NAME}.so"
        if target.exists():
            walk = _import(target)
    except Exception as error:  # built for another torch's ABI despite the name, a broken file
        logger.warning("pipefold: the C++ graph walk does not load (%s); the Python walk runs instead", error)
    _loaded.append(walk)
    return walk


def _import(target: Path) -> GraphWalk:
    loader = importlib.machinery.ExtensionFileLoader(_NAME, str(target))
    spec = importlib.util.spec_from_file_location(_NAME, target, loader=loader)
    if spec is None:
        raise ImportError(f"no module spec for {target}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return GraphWalk(
        record=cast(RecordFn, module.record),
        match=cast(MatchFn, module.match),
    )


def reset() -> None:
    """Forget `load`'s answer (tests: after changing `PIPEFOLD_PYTHON_WALK`)."""
    _loaded.clear()
