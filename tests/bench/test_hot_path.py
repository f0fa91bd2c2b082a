"""benchmarks/hot_path.py: py-spy samples charged to the right category."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hot_path.py"
spec = importlib.util.spec_from_file_location("hot_path", SCRIPT)
assert spec is not None and spec.loader is not None
hot_path = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hot_path)

LOOP = (
    'process 1:"python";<module> (x.py:1);Pipeline.step (pipefold/runtime/pipeline.py:9);'
    "Executor.run (pipefold/runtime/executor.py:170)"
)
ENGINE = "backward_full (b.py:1);_engine_run_backward (torch/autograd/graph.py:1)"


def test_samples_are_charged_to_the_most_specific_category():
    lines = [
        f"{LOOP};Executor._backward (e.py:1);{ENGINE} 50",
        f"{LOOP};Executor._forward (e.py:2);Stage.forward (s.py:1);Linear.forward (l.py:1) 30",
        # a saved-tensor hook inside a layer's forward counts as counting, not as the layer
        f"{LOOP};Executor._forward (e.py:2);Stage.forward (s.py:1);ActivationCounter._pack (m.py:1) 5",
        f"{LOOP};Executor._backward (e.py:1);Executor._complete (e.py:3);_ShmReceive.wait (c.py:1) 10",
        f"{LOOP};Executor._release (e.py:300) 5",
        # outside the executor loop: not counted at all
        "process 1:\"python\";<module> (x.py:1);Pipeline.__init__ (p.py:1) 99",
        "garbage",
    ]
    total, counts, own = hot_path.categorize(lines)
    assert total == 100
    assert counts["autograd engine (backward kernels)"] == 50
    assert counts["layer forward (torch modules)"] == 30
    assert counts["activation counting (saved-tensor hooks)"] == 5
    assert counts["waiting for a neighbour's message"] == 10
    assert counts[hot_path.OTHER] == 5 and own == {"Executor._release (e.py:300)": 5}
