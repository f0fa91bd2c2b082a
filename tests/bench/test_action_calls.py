"""benchmarks/action_calls.py: the call counter's categories and per-action arithmetic (no ranks)."""

from __future__ import annotations

import collections
import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "action_calls.py"
spec = importlib.util.spec_from_file_location("action_calls", SCRIPT)
assert spec is not None and spec.loader is not None
action_calls = importlib.util.module_from_spec(spec)
spec.loader.exec_module(action_calls)

RUNTIME, COMPUTE, HOOK, INSIDE, POLL = (
    action_calls.RUNTIME, action_calls.COMPUTE, action_calls.HOOK, action_calls.INSIDE, action_calls.POLL
)


def _leaf() -> int:
    return 1


def _hook() -> int:  # this file stands for the runtime: a call back from compute is a hook
    return abs(-1)


# Named as torch's module call (a compute entry) and compiled as a file outside the runtime's.
_torch_like: dict[str, object] = {"_leaf": _leaf, "_hook": _hook}
_SOURCE = "def _wrapped_call_impl():\n    return _leaf() + _hook() + max(1, 2)\n"
exec(compile(_SOURCE, "torch_like.py", "exec"), _torch_like)
_wrapped_call_impl = _torch_like["_wrapped_call_impl"]


def wait_until() -> int:  # named as the watchdog's poll
    return _leaf() + len("ab")


def _handler() -> int:
    return len("a") + _leaf() + _wrapped_call_impl() + wait_until() + _leaf()  # type: ignore[operator]


def _counted(label: str | None) -> dict[str, collections.Counter[tuple[str, str]]]:
    counter = action_calls.CallCounter(lambda: label, runtime_files=("test_action_calls",))
    sys.setprofile(counter)
    try:
        _handler()
    finally:
        sys.setprofile(None)
    return counter.counts


def _by_category(counts: collections.Counter[tuple[str, str]]) -> dict[str, int]:
    totals: collections.Counter[str] = collections.Counter()
    for (category, _), calls in counts.items():
        totals[category] += calls
    return dict(totals)


def test_each_call_goes_to_its_category_and_regions_end_with_their_frame():
    counts = _counted("F")
        # _handler, len, _leaf, _leaf (after the regions closed) and the final sys.setprofile C call.
    # Inside the entry: _leaf, _hook and its abs are the runtime's (hooks), max the entry's own.
    assert _by_category(counts["F"]) == {RUNTIME: 5, COMPUTE: 1, INSIDE: 1, HOOK: 3, POLL: 3}
    assert counts["F"][(COMPUTE, "torch_like.py:_wrapped_call_impl")] == 1
    assert counts["F"][(HOOK, "builtins.abs")] == 1
    assert counts["F"][(INSIDE, "builtins.max")] == 1
    assert counts["F"][(POLL, "builtins.len")] == 1
    assert counts["F"][(RUNTIME, "builtins.len")] == 1


def test_no_label_counts_nothing():
    assert not _counted(None)


def test_per_action_and_the_headline_divide_by_the_actions():
    counts = {
        "F": collections.Counter({(RUNTIME, "a"): 10, (COMPUTE, "m"): 4, (INSIDE, "t"): 100, (POLL, "p"): 7}),
        "SEND_F": collections.Counter({(RUNTIME, "s"): 6}),
        "B": collections.Counter({(RUNTIME, "b"): 8, (HOOK, "h"): 2}),
    }
    table = action_calls.per_action(counts, {"F": 2, "SEND_F": 2, "B": 2})
    assert table["F"] == {RUNTIME: 5.0, COMPUTE: 2.0, INSIDE: 50.0, POLL: 3.5}
    assert table["B"] == {RUNTIME: 4.0, HOOK: 1.0}
    # (10 + 4 + 6 + 8 + 2) runtime calls over 4 compute actions; inside compute and polls left out.
    assert action_calls.runtime_per_compute_action(counts, 4) == 7.5
