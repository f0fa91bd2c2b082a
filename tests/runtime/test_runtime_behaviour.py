"""Runtime behaviour beyond exactness: async schedules, the measured timeline, non-finite losses."""

from __future__ import annotations

import pytest

from pipefold.runtime import measured_cost_model
from pipefold.schedule import WeightUpdate, build, names
from pipefold.schedule.lower import fuse_adjacent_split_backward
from pipefold.simulate import simulate
from pipefold.timeline import Timeline

ASYNC = [
    n for n in names() if build(n, num_ranks=2, num_microbatches=2).weight_update is not WeightUpdate.FLUSH
]


@pytest.mark.parametrize("schedule", ASYNC)
@pytest.mark.parametrize("num_microbatches", [1, 4])
def test_async_one_rank_replays_the_schedule(pool1, schedule, num_microbatches):
    # The case itself compares with a replay of the schedule's F/B/STEP order.
    (result,) = pool1.run("asynchronous", schedule=schedule, num_microbatches=num_microbatches)
    assert result["changed"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ASYNC)
def test_async_two_ranks_updates_weights(pool2, schedule):
    results = pool2.run("asynchronous", schedule=schedule, num_microbatches=4)
    assert results[0]["loss"] == results[1]["loss"]
    assert all(r["changed"] for r in results)
    versions = results[0]["versions"]
    assert len(versions) == 2 and all(v >= 1 for v in versions)
    # Rank 0 has micro-batches in flight across updates, so it holds more than one version.
    assert versions[0] >= 2


def _check_streaming(results, steps):
    assert all(r["losses"] == results[0]["losses"] for r in results), "ranks disagree on the losses"
    assert len(results[0]["losses"]) == steps
    # The measured timeline is the whole run: every action of the unrolled schedule, once.
    result = results[0]
    for events, expected in zip(result["events"], result["unrolled"], strict=True):
        assert sorted(events) == sorted(expected)
    # Each case compares every update with the emulation; the other version rule (lag 0 vs 1)
    # gives other updates, so the comparison tells the two rules apart.
    assert any(r["other_rule_differs"] for r in results)


@pytest.mark.parametrize("schedule", ASYNC)
def test_streaming_one_rank_equals_the_version_schedule_emulation(pool1, schedule):
    results = pool1.run("streaming", schedule=schedule, num_microbatches=2, steps=3)
    _check_streaming(results, 3)


@pytest.mark.multiprocess
def test_step_of_an_asynchronous_schedule_with_tied_layers_equals_the_emulation(pool2):
    """`step()` of pipedream-2bw on the tied transformer, three calls: each update sums the two
    copies' gradients (the same reduction as a stream), against the emulation of the calls one
    after the other (each drains; a forward uses its stage's newest weights)."""
    results = pool2.run(
        "streaming", schedule="pipedream-2bw", num_microbatches=4, steps=3, model="transformer", calls="step"
    )
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert any(r["other_rule_differs"] for r in results)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("schedule", "num_microbatches", "steps", "recompute", "model", "shared_memory"), [
    ("pipedream", 3, 3, "none", "mlp", True), ("pipedream", 1, 4, "none", "mlp", True),
    ("pipedream-2bw", 2, 3, "none", "mlp", True), ("pipedream-2bw", 1, 4, "none", "mlp", True),
    ("pipedream", 2, 3, "full", "mlp", True), ("pipedream-2bw", 3, 2, "full", "mlp", True),
    ("pipedream", 2, 3, (1, 2), "mlp", True),
    ("pipedream", 2, 3, "none", "transformer", False), ("pipedream-2bw", 2, 3, (1, 2), "transformer", True),
])
def test_streaming_two_ranks_equals_the_version_schedule_emulation(
    pool2, schedule, num_microbatches, steps, recompute, model, shared_memory
):
    """Step k+1's forwards overlap step k's backwards; every update equals the emulation's
    (with full and selective recomputation too: the recomputed forward runs on the stashed
    version; the transformer ties its embedding and head across the two stages, and both
    copies apply the summed gradient at every update, once with every message through the
    process group)."""
    results = pool2.run(
        "streaming", schedule=schedule, num_microbatches=num_microbatches, steps=steps,
        recompute=recompute, model=model, shared_memory=shared_memory,
    )
    _check_streaming(results, steps)
    versions = results[0]["weight_versions_peak"]
    # Rank 0 holds a micro-batch across an update of its stage: two versions. 2BW never more,
    # and only from step 2 on (steps 0 and 1 both run on the initial weights).
    if schedule == "pipedream":
        assert versions == [2, 1]
    else:
        assert versions[0] == (2 if steps >= 3 else 1) and versions[1] <= 2


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "fuse"),
    [("gpipe", True), ("1f1b", True), ("zb-h1", True), ("zb-h1", False), ("zb-v", True),
     ("interleaved-1f1b", True)],
)
def test_timeline_holds_each_ranks_compute_actions(pool2, schedule, fuse):
    if schedule not in names():
        pytest.skip(f"{schedule} is not registered")
    expected = build(schedule, num_ranks=2, num_microbatches=4)
    if fuse:
        expected = fuse_adjacent_split_backward(expected)
    (result, _) = pool2.run("timeline", schedule=schedule, num_microbatches=4, fuse_backward=fuse)
    for rank in range(2):
        assert sorted(result["events"][rank]) == sorted(str(a) for a in expected.actions[rank])
    assert result["ordered"] and result["waits_ok"] and result["json_roundtrip"]
    assert result["num_waits"][1] > 0  # rank 1 waits for every activation it receives
    assert result["weight_versions_peak"] == [1, 1]


@pytest.mark.multiprocess
def test_full_recompute_holds_fewer_activation_bytes(pool2):
    plain = pool2.run("timeline", schedule="gpipe", num_microbatches=4)[0]["activation_bytes_peak"]
    recomputed = pool2.run("timeline", schedule="gpipe", num_microbatches=4, recompute="full")[0]
    assert all(r < p for r, p in zip(recomputed["activation_bytes_peak"], plain, strict=True))


@pytest.mark.multiprocess
def test_nonfinite_loss_raises_on_every_rank(pool2):
    results = pool2.run("nonfinite", mode="raise")
    for result in results:
        assert result["type"] == "NonFiniteLoss"
        assert "micro-batch(es) [1]" in result["message"]


@pytest.mark.multiprocess
def test_nonfinite_loss_skip_leaves_gradients_unchanged(pool2):
    # The case checks that the gradients equal those before the bad step, and steps again.
    results = pool2.run("nonfinite", mode="skip")
    assert all(r["type"] is None and r["message"] == "nan" for r in results)


@pytest.mark.multiprocess
def test_measured_cost_model_replays_in_the_simulator(pool2):
    # The pipeline runs (and measures) the fused schedule: stage 0's I/W pairs run as B.
    schedule = fuse_adjacent_split_backward(build("zb-h1", num_ranks=2, num_microbatches=4))
    (result, _) = pool2.run("timeline", schedule="zb-h1", num_microbatches=4)
    measured = Timeline.from_json(result["json"])
    costs = measured_cost_model(measured, schedule)
    assert costs.num_stages == 2
    assert all(t > 0 for t in costs.f + costs.i + costs.w)
    assert all(b > 0 for b in costs.activation_bytes)
    predicted = simulate(schedule, costs)
    assert predicted.source == "simulated"
    assert sorted(str(e.action) for e in predicted.events[0]) == sorted(
        str(e.action) for e in measured.events[0]
    )


@pytest.mark.multiprocess
def test_measured_ranks_share_one_time_axis_and_waits_are_not_compute(pool2):
    (result, _) = pool2.run("timeline", schedule="gpipe", num_microbatches=4)
    line = Timeline.from_json(result["json"])
    first = {str(e.action): e for row in line.events for e in row}
    # Rank 1's first forward needs rank 0's first output: on one clock it cannot start earlier.
    assert first["F1.0"].start >= first["F0.0"].end
    # The wait for that message ends where the compute event begins.
    wait = next(w for w in line.waits[1] if str(w.waiting_for) == "F1.0")
    assert first["F1.0"].start >= wait.end


@pytest.mark.multiprocess
@pytest.mark.parametrize(("first", "then"), [("1f1b", "zb-h1"), ("zb-h1", "gpipe"), ("gpipe", "1f1b")])
def test_a_pipeline_switches_schedule_between_steps_and_stays_exact(pool2, first, then):
    """Step 1 under one family, step 2 under another (accumulating): one process's gradients."""
    results = pool2.run("exact", schedule=first, num_microbatches=4, switch_to=then)
    assert all(r["ran"] == [first, then] for r in results)
    # What ran in step 2 is the new order: zb-h1 keeps some backwards split into I and W.
    split = {"I", "W"} <= set(results[0]["last_ops"])
    assert split == (then == "zb-h1")


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("to", "num_virtual", "words"),
    [("interleaved-1f1b", 2, "stage placement"), ("pipedream", None, "weight update")],
)
def test_a_schedule_of_another_layout_is_refused(pool2, to, num_virtual, words):
    results = pool2.run("switch_refused", to=to, num_virtual=num_virtual)
    assert all(r is not None and words in r for r in results)
