"""benchmarks/hop.py: a message's three parts matched across the ranks' logs (no ranks)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hop.py"
spec = importlib.util.spec_from_file_location("hop", SCRIPT)
assert spec is not None and spec.loader is not None
hop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hop)


def test_each_message_is_split_at_its_flag_and_its_sighting(tmp_path: Path) -> None:
    us = 1e-6
    # Rank 0: F0.0 ends at 10, its flag is set at 13; B0.0 waits from 30, sees the gradient at 52
    # and starts its backward at 55. Rank 1: F1.0 waits from 5, sees it at 15, computes from 19;
    # B1.0 ends at 40, its flag at 50.
    rank0 = {"1f1b": [{
        "compute": [["F", 0, 0, 0 * us, 10 * us], ["B", 0, 0, 55 * us, 70 * us]],
        "flag": [["SEND_F", 0, 0, 13 * us]],
        "seen": [["B", 0, 0, 30 * us, 52 * us]],
    }]}
    rank1 = {"1f1b": [{
        "compute": [["F", 1, 0, 19 * us, 25 * us], ["B", 1, 0, 26 * us, 40 * us]],
        "flag": [["SEND_B", 1, 0, 50 * us]],
        "seen": [["F", 1, 0, 5 * us, 15 * us]],
    }]}
    (tmp_path / "rank0.json").write_text(json.dumps(rank0))
    (tmp_path / "rank1.json").write_text(json.dumps(rank1))
    lines = {line.split(" n=")[0].split(None, 1)[1].strip(): line for line in hop.report(tmp_path, 2)}
    # Forward: (a) 13 - 10, (b) 15 - 13, (c) 19 - 15; gradient: (a) 50 - 40, (b) 52 - 50, (c) 55 - 52.
    assert ("(a) compute end -> flag 3.0 µs, (b) flag -> seen 2.0 µs, (c) seen -> compute start 4.0 µs"
            in lines["waited F"])
    assert ("(a) compute end -> flag 10.0 µs, (b) flag -> seen 2.0 µs, (c) seen -> compute start 3.0 µs"
            in lines["waited B"])
    assert "n=    2" in lines["all"] and "n=    2" in lines["waited"]
