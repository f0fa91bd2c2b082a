"""Transparency: every flush schedule gives the loss and gradients of one process.

Each (family, ranks) runs several configurations: uneven batches, M < ranks,
full and selective recomputation, an MLP, and a tiny transformer whose boundary
is a (hidden, mask) tuple and whose embedding is tied to the output head.
Every rank compares its own gradients with a single-process reference
(`_cases.exact`), accumulated over two steps.
"""

from __future__ import annotations

import pytest

from pipefold.schedule import WeightUpdate, build, names

FLUSH = [n for n in names() if build(n, num_ranks=2, num_microbatches=2).weight_update is WeightUpdate.FLUSH]

# (model, num_microbatches, rows, recompute): rows not divisible by M makes uneven micro-batches.
CONFIGS = {
    1: [("mlp", 3, 10, "none"), ("transformer", 2, 5, "full")],
    2: [("mlp", 4, 10, "none"), ("mlp", 1, 5, "full"), ("transformer", 3, 7, [1, 3])],
    4: [("mlp", 8, 11, "none"), ("mlp", 2, 6, "full"), ("transformer", 4, 9, [2, 5])],
}


def _ids(configs):
    return [f"{m}-M{mb}-rows{rows}-{'sel' if isinstance(rc, list) else rc}" for m, mb, rows, rc in configs]


def _check(results, world_size):
    losses = [r["losses"] for r in results]
    assert all(row == losses[0] for row in losses), "ranks disagree on the loss"
    for result in results:
        assert result["source"] == "measured"
        assert len(result["num_events"]) == world_size
        assert all(count > 0 for count in result["num_events"])
        assert all(peak > 0 for peak in result["activation_bytes_peak"])
    owned = [name for r in results for name in r["names"]]
    # Every parameter lives on some rank; only tied ones (embedding "0.weight") on several.
    assert len(set(owned)) == len(owned) - max(owned.count("0.weight") - 1, 0)


def _run_exact(pool, schedule, config, num_ranks):
    model, num_microbatches, rows, recompute = config
    results = pool.run(
        "exact", schedule=schedule, num_microbatches=num_microbatches, model=model, rows=rows,
        recompute=recompute,
    )
    _check(results, num_ranks)


@pytest.mark.parametrize("schedule", FLUSH)
@pytest.mark.parametrize("config", CONFIGS[1], ids=_ids(CONFIGS[1]))
def test_one_rank(pool1, schedule, config):
    _run_exact(pool1, schedule, config, 1)


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", FLUSH)
@pytest.mark.parametrize("config", CONFIGS[2], ids=_ids(CONFIGS[2]))
def test_two_ranks(pool2, schedule, config):
    _run_exact(pool2, schedule, config, 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", FLUSH)
@pytest.mark.parametrize("config", CONFIGS[4], ids=_ids(CONFIGS[4]))
def test_four_ranks(pool4, schedule, config):
    _run_exact(pool4, schedule, config, 4)


@pytest.mark.multiprocess
def test_a_split_module_with_a_tied_head_over_four_ranks(pool4):
    """`pipefold.split` of a transformer whose head shares the embedding's weight, on 4 ranks: the
    weight (stages 0 and 3) is tied across ranks 0 and 3, and after 3 SGD steps every weight still
    equals one process's (tests/runtime/_split_cases.py; 2 ranks: test_split_pipeline.py)."""
    results = pool4.run("split_exact", model="natural", schedule="1f1b")
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert {tuple(owners) for r in results for owners in r["tied_ranks"]} == {(0, 3)}
    assert set(key for r in results for key in r["state_keys"]) == set(results[0]["expected_keys"])


@pytest.mark.multiprocess
def test_a_skip_connection_across_four_ranks(pool4):
    """A transformer whose embedding output skips all its blocks to the head (`head(norm(x + x0))`),
    split without split points: cut at every block through a graph capture (8 pieces, 2 per
    stage), the skip carried across all three rank boundaries, the tied head on ranks 0 and 3;
    loss, every gradient and after 3 SGD steps every weight equal one process's."""
    results = pool4.run("split_exact", model="skip-blocks", schedule="1f1b", num_blocks=6)
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert {tuple(owners) for r in results for owners in r["tied_ranks"]} == {(0, 3)}
    assert set(key for r in results for key in r["state_keys"]) == set(results[0]["expected_keys"])


SPLIT_SCHEDULES = [("1f1b", None), ("interleaved-1f1b", 2), ("zb-v", None), ("dualpipe-v", None)]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("schedule", "num_virtual"), SPLIT_SCHEDULES, ids=[s for s, _ in SPLIT_SCHEDULES])
def test_a_split_hugging_face_llama_over_four_ranks(pool4, schedule, num_virtual):
    """`pipefold.split` of a Hugging Face Llama (6 blocks: 8 layers, one per stage at v = 2; rotary
    tables and grouped-query attention) on 4 ranks under each schedule: loss, every gradient and,
    after each of 3 SGD steps, every weight equal one process's."""
    results = pool4.run(
        "split_exact", model="llama", schedule=schedule, num_virtual=num_virtual, num_blocks=6
    )
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert set(key for r in results for key in r["state_keys"]) == set(results[0]["expected_keys"])
    assert all(r["state_keys"] for r in results), "a rank holds no layer"


TIED_SPLITS = [
    ("gpt2", "1f1b", None, {(0, 3)}),
    ("gpt2", "interleaved-1f1b", 2, {(0, 3)}),
    ("gpt2", "zb-v", None, set()),
    ("gpt2", "dualpipe-v", None, set()),
    ("natural", "interleaved-1f1b", 2, {(0, 3)}),
    ("natural", "zb-v", None, set()),
    ("natural", "dualpipe-v", None, set()),
    ("skip-blocks", "interleaved-1f1b", 2, {(0, 3)}),
    ("skip-blocks", "zb-v", None, set()),
    ("skip-blocks", "dualpipe-v", None, set()),
]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("model", "schedule", "num_virtual", "tied"), TIED_SPLITS, ids=[f"{m}-{s}" for m, s, _, _ in TIED_SPLITS]
)
def test_split_tied_heads_over_four_ranks_under_v_and_interleaved(pool4, model, schedule, num_virtual, tied):
    """GPT-2 (Hugging Face, tied head), the natural transformer (head sharing the embedding's
    weight) and the skip-connection transformer (graph-captured, `head(norm(x + x0))`) under 1F1B,
    interleaved 1F1B and the V placement (zb-v, dualpipe-v), 6 blocks (8 layers) on 4 ranks: the
    embedding and the head are on the first and the last stage, ranks 0 and 3 (tied across them)
    or both rank 0 in the V; loss, every gradient and after 3 SGD steps every weight equal one
    process's."""
    results = pool4.run("split_exact", model=model, schedule=schedule, num_virtual=num_virtual, num_blocks=6)
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert {tuple(owners) for r in results for owners in r["tied_ranks"]} == tied
    assert set(key for r in results for key in r["state_keys"]) == set(results[0]["expected_keys"])


@pytest.mark.multiprocess
@pytest.mark.parametrize(("schedule", "model"), [
    ("pipedream", "mlp"), ("pipedream-2bw", "mlp"), ("pipedream-2bw", "transformer"),
])
def test_streaming_four_ranks_equals_the_version_schedule_emulation(pool4, schedule, model):
    """A streaming run (`Pipeline.train`): every update of every stage equals a one-process
    emulation of the same weight-version schedule (tests/runtime/_stream_reference.py); the
    transformer ties its embedding and head across ranks 0 and 3."""
    results = pool4.run("streaming", schedule=schedule, num_microbatches=4, steps=3, model=model)
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert any(r["other_rule_differs"] for r in results)
    versions = results[0]["weight_versions_peak"]
    assert max(versions) == (4 if schedule == "pipedream" else 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize(("schedule", "model", "calls"), [
    ("pipedream", "transformer", "train"), ("pipedream-2bw", "mlp", "train"),
    ("pipedream", "transformer", "step"),
])
def test_streaming_two_replicas_of_two_ranks_equal_the_emulation(pool4, schedule, model, calls):
    """dp2 x pp2: each replica streams its own batches and every update applies the replicas'
    mean gradient (the emulation runs both replicas on one set of weights), tied embedding and
    head included; the losses are the replicas' mean, the same on all four ranks. `step` calls
    (each drains) reduce every update the same way."""
    results = pool4.run(
        "streaming", schedule=schedule, num_microbatches=2, steps=3, model=model, mesh=(2, 2), calls=calls
    )
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert any(r["other_rule_differs"] for r in results)


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["pipedream", "pipedream-2bw"])
def test_streaming_bf16_weights_with_fp32_masters_at_pp2(pool2, schedule):
    """`precision="bf16-pure"` streaming: bf16 weights and weight versions, each stage's optimizer
    stepping fp32 masters (`fp32_master_weights`), equal to the emulation with fp32 masters
    (`_cases._check_pure`: every update's change of every master, the bf16 weights the masters
    rounded, the losses)."""
    results = pool2.run(
        "streaming", schedule=schedule, num_microbatches=4, steps=3, model="mlp", precision="bf16-pure"
    )
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert all(r["other_rule_differs"] for r in results)


@pytest.mark.multiprocess
def test_streaming_bf16_weights_two_replicas_and_a_tied_embedding(pool4):
    """bf16-pure at dp2 x pp2 with the embedding tied to the head across the pipeline's ranks:
    each update's gradient summed over the tied owners and the replicas in fp32 (no bf16
    all-reduce), equal to the emulation with fp32 masters."""
    results = pool4.run(
        "streaming", schedule="pipedream", num_microbatches=2, steps=3, model="transformer", mesh=(2, 2),
        precision="bf16-pure",
    )
    assert all(r["losses"] == results[0]["losses"] for r in results)
    for result in results:
        reduced = result["reduced"]
        assert "torch.bfloat16" not in reduced and "torch.float32" in reduced, reduced
    assert all(r["other_rule_differs"] for r in results)


@pytest.mark.multiprocess
def test_hugging_face_gpt2_cut_at_named_points_over_four_ranks(pool4):
    """`split_points` on a Hugging Face GPT-2 of 3 blocks, cut before block 1, inside block 2 and
    before the final norm (4 graph pieces, one per stage; one process checks Llama's too, in
    tests/model/test_split_graph.py): the head tied to the embedding across ranks 0 and 3; loss,
    every gradient and after 3 SGD steps every weight equal one process's under 1F1B."""
    results = pool4.run("split_exact", model="gpt2-points", schedule="1f1b")
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert {tuple(owners) for r in results for owners in r["tied_ranks"]} == {(0, 3)}
    assert set(key for r in results for key in r["state_keys"]) == set(results[0]["expected_keys"])


TENSOR_PARALLEL_PARTS = {
    "llama": ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
              "self_attn.q_proj", "self_attn.v_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}


@pytest.mark.multiprocess
@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("schedule", ["1f1b", "zb-v"])
def test_split_hugging_face_models_at_pp2_by_tp2(pool4, model, schedule):
    """hf_tensor_parallel_plan on models cut by pipefold.split (pp=2 x tp=2), the loss and every
    gradient equal the unsplit module's (zb-v: W computes the sharded weights' gradients). Llama:
    each tp rank holds 2 of the 4 query heads, 1 of the 2 key/value heads and half of the gated
    MLP. GPT-2: 1 of the 2 heads (its query, key and value columns of the fused c_attn) and half
    of the MLP; the head tied to the embedding stays whole, tied across the pipeline ranks."""
    results = pool4.run("split_tp_exact", model=model, schedule=schedule)
    assert all(r["losses"] == results[0]["losses"] for r in results)
    sharded = sorted({name for r in results for name in r["sharded"]})
    block = "model.layers" if model == "llama" else "transformer.h"
    expected = [f"{block}.{i}.{part}.weight" for i in range(4) for part in TENSOR_PARALLEL_PARTS[model]]
    assert [name for name in sharded if name.endswith(".weight")] == expected
    # Llama's q_proj: 2 heads of 4 features, of 16 inputs; GPT-2's c_attn: [q | k | v] of 1 head of 8.
    shape = (8, 16) if model == "llama" else (16, 24)
    assert {shape for r in results for shape in r["query_shards"]} == {shape}


@pytest.mark.multiprocess
def test_device_mesh_pp_dim(pool2):
    results = pool2.run("exact", schedule="1f1b", num_microbatches=3, model="transformer", mesh=(2,))
    _check(results, 2)


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["1f1b", "zb-v"])
def test_two_pipelines_in_a_dp_by_pp_mesh(pool4, schedule):
    # Ranks (0, 1) and (2, 3) run two independent two-stage pipelines, tied embedding included.
    results = pool4.run("exact", schedule=schedule, num_microbatches=3, model="transformer", mesh=(2, 2))
    _check(results[:2], 2)
    _check(results[2:], 2)


@pytest.mark.multiprocess
def test_ranks_on_one_host_talk_through_shared_memory(pool2):
    results = pool2.run("exact", schedule="zb-v", num_microbatches=4, model="transformer")
    _check(results, 2)
    assert [r["same_host_peers"] for r in results] == [[1], [0]]


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zb-v", "dualpipe-v"])
def test_process_group_transport_is_exact_too(pool4, schedule):
    results = pool4.run(
        "exact", schedule=schedule, num_microbatches=4, model="transformer", shared_memory=False
    )
    _check(results, 4)
    assert all(r["same_host_peers"] == [] for r in results)


@pytest.mark.multiprocess
@pytest.mark.parametrize("capacity", [64, 1500])
def test_steps_larger_than_the_channel_use_the_process_group(pool2, capacity):
    # 64 bytes holds no step's traffic; 1500 holds the forward direction (2 rows x 8
    # floats per micro-batch of the MLP) but not both, so one step mixes the transports.
    results = pool2.run(
        "exact", schedule="1f1b", num_microbatches=3, model="mlp", rows=6, shared_memory_bytes=capacity
    )
    _check(results, 2)
    assert [r["same_host_peers"] for r in results] == [[1], [0]]


@pytest.mark.multiprocess
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_same_host_ranks_use_shared_memory_and_doorbells_when_sharing_cores(pool2, pool4, num_ranks):
    """The exact results above went through shared memory; doorbells exactly where ranks
    outnumber the cores (4 ranks on this 2-core machine), and there the timeline records
    how many could compute at once, for the simulator's replay ([Note: shared cores])."""
    from pipefold.runtime.processes.cores import ranks_share_cores, shared_cores
    from pipefold.runtime.transport.shm import shm_supported

    if not shm_supported():
        pytest.skip("shared memory needs x86-64 Linux")
    pool = pool2 if num_ranks == 2 else pool4
    results = pool.run("timeline", schedule="1f1b", num_microbatches=num_ranks)
    sharing = ranks_share_cores(num_ranks)
    assert results[0]["json"]["meta"].get("num_cores") == shared_cores(num_ranks, threads_per_rank=1)
    for rank, result in enumerate(results):
        transport = result["transport"]
        neighbours = sorted({r for r in (rank - 1, rank + 1) if 0 <= r < num_ranks})
        assert transport["shm_peers"] == neighbours
        assert transport["exchange"]
        assert transport["exchange_doorbells"] == sharing
        # Every neighbour sends to this rank (activations forward, gradients back).
        assert transport["doorbell_peers"] == (neighbours if sharing else [])


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("placement", "model", "num_microbatches"),
    [("contiguous", "mlp", 4), ("v", "transformer", 4), ("looped", "mlp", 3),
     ("contiguous", "transformer", 1)],
)
def test_a_tuned_schedule_is_agreed_and_exact(pool2, placement, model, num_microbatches):
    """tune_schedule: every rank gets rank 0's schedule, searched from costs measured in the probe
    (every op of every stage timed), and the pipeline on it matches one process."""
    results = pool2.run("tuned", placement=placement, model=model, num_microbatches=num_microbatches)
    assert results[0]["schedule"] == results[1]["schedule"]
    trials = results[0]["trials"]
    if trials:  # the searched schedule against the best families, measured: rank 0's fastest runs
        assert trials[0][0] == "auto" and 2 <= len(trials) <= 3
        assert len({name for name, _ in trials}) == len(trials)
        assert results[0]["schedule"]["name"] == min(trials, key=lambda trial: trial[1])[0]
        assert "measured trial" in results[0]["summary"]
        # At least two rounds; at most num_trial_steps (6), the same on both ranks.
        assert 2 <= results[0]["trial_rounds"] <= 6
        assert results[0]["trial_rounds"] == results[1]["trial_rounds"]
    else:  # no family of the layout fits the memory cap beside the searched order
        assert results[0]["schedule"]["name"] == "auto"
    assert all(r["costs_positive"] for r in results)
    assert results[0]["num_probe_steps_kept"] == 2
    # The searched order is never slower than the probe's own family under the same costs where
    # that family fits the default memory cap (1F1B's peak), so the search includes it;
    # interleaved 1F1B holds more. A family that won the measured trial instead may be predicted
    # slower: the trial's measurement overrides the prediction by design.
    if placement != "looped" and results[0]["schedule"]["name"] == "auto":
        assert results[0]["predicted_step_s"] <= results[0]["probe_predicted_step_s"] * (1 + 1e-9)
    assert "auto schedule for 2 ranks" in results[0]["summary"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("schedule, num_virtual", [("1f1b", None), ("interleaved-1f1b", 2), ("zb-v", 2)])
def test_variable_length_batches(pool2, schedule, num_virtual):
    """A tiny GPT whose sequence length changes from step to step (8, 32, 16, 64, 8), then from
    micro-batch to micro-batch (`Microbatches`): loss and every gradient equal one process's at
    every step (`_cases.varlen`). Channels of 4 KiB carry the short steps through shared memory
    and the long ones through the process group, in one run."""
    results = pool2.run(
        "varlen", schedule=schedule, num_virtual=num_virtual, shared_memory_bytes=4096,
        lengths=[8, 32, 16, 64, 8, [8, 32], [64, 16]],
    )
    assert results[0]["losses"] == results[1]["losses"]
    through_shm = [active for r in results for active in r["shm_active"]]
    assert True in through_shm and False in through_shm, through_shm
