"""Chrome/Perfetto trace export: one pid per rank, X events with action args, waits apart."""


from pipefold.schedule import build
from pipefold.simulate import CostModel, simulate
from pipefold.viz import to_chrome_trace


def gpipe_2x2():
    return simulate(build("gpipe", num_ranks=2, num_microbatches=2), CostModel.uniform(2))


def test_trace_structure():
    trace = to_chrome_trace(gpipe_2x2())
    assert trace["displayTimeUnit"] == "ms"
    events = trace["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {(0, "rank 0"), (1, "rank 1")}
    compute = [e for e in events if e["ph"] == "X" and e["cat"] != "wait"]
    assert len(compute) == 8
    first = next(e for e in compute if e["name"] == "B1.0")
    assert first == {
        "ph": "X",
        "name": "B1.0",
        "cat": "B",
        "pid": 1,
        "tid": 0,
        "ts": 3e6,
        "dur": 2e6,
        "args": {"stage": 1, "microbatch": 0, "op": "B", "step": 0},
    }


def test_waits_are_separate_events_on_their_own_thread():
    trace = to_chrome_trace(gpipe_2x2())
    waits = [e for e in trace["traceEvents"] if e.get("cat") == "wait"]
    assert {(e["pid"], e["tid"], e["name"], e["ts"], e["dur"]) for e in waits} == {
        (0, 1, "wait B0.0", 2e6, 3e6),
        (1, 1, "wait F1.0", 0.0, 1e6),
    }
