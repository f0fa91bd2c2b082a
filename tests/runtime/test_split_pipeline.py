"""`pipefold.split` modules and shared parameters in a 2-rank `Pipeline`, exact against one process.

For a transformer written the natural way, one with a skip connection around its blocks cut at
named points through a graph capture (the skip crosses the cuts), Hugging Face GPT-2 (head tied
to the embedding) and Llama, under 1f1b, interleaved-1f1b (v=2), zb-v and dualpipe-v: the loss,
every gradient and, after each of 3 SGD steps, every weight equal the unsplit module's on one
process (the tied GPT-2 weight on two ranks trained two diverging copies before it was tied).
The gathered state dict has the module's own keys. A plain layer list whose head shares the
embedding's weight is tied the same way; what cannot be tied is refused naming both uses. The
ranks' side is tests/runtime/_split_cases.py; 4 ranks run in tests/runtime/test_runtime_exact.py.
"""

from __future__ import annotations

import pytest
from _workers import WorkerPool

pytestmark = pytest.mark.multiprocess

SCHEDULES = [("1f1b", None), ("interleaved-1f1b", 2), ("zb-v", None), ("dualpipe-v", None)]


@pytest.fixture(scope="module")
def pool():
    pool = WorkerPool(2, cases="_split_cases")
    yield pool
    pool.close()


def _check(results):
    assert results[0]["losses"] == results[1]["losses"], "ranks disagree on the loss"
    gathered = [key for result in results for key in result["state_keys"]]
    # Every entry of the module's state dict once, except the shared weight on both of its ranks.
    assert set(gathered) == set(results[0]["expected_keys"])
    return {tuple(owners) for result in results for owners in result["tied_ranks"]}


@pytest.mark.parametrize("model", ["natural", "skip", "gpt2", "llama"])
@pytest.mark.parametrize(("schedule", "num_virtual"), SCHEDULES, ids=[s for s, _ in SCHEDULES])
def test_split_module_is_exact(pool, model, schedule, num_virtual):
    results = pool.run("exact", model=model, schedule=schedule, num_virtual=num_virtual)
    tied = _check(results)
    # The embedding (stage 0) and the head (last stage) are on two ranks unless the V
    # placement puts both stages on rank 0; Llama's head is not tied.
    two_ranks = model != "llama" and schedule in ("1f1b", "interleaved-1f1b")
    assert tied == ({(0, 1)} if two_ranks else set())


@pytest.mark.parametrize(("schedule", "num_virtual"), [("1f1b", None), ("zb-v", None)])
def test_a_module_built_on_meta_materializes_only_each_ranks_pieces(pool, schedule, num_virtual):
    """Built under `torch.device("meta")` on every rank: each rank materializes only its own
    pieces (the modules' own reset_parameters, seeded by path, so the tied weight starts equal
    on both ranks) and holds less than the whole model; exact against one process."""
    results = pool.run("exact", model="lazy", schedule=schedule, num_virtual=num_virtual, num_blocks=6)
    tied = _check(results)
    assert tied == ({(0, 1)} if schedule == "1f1b" else set())
    whole = results[0]["whole_bytes"]
    assert all(0 < r["held_bytes"] < whole * 0.75 for r in results), [r["held_bytes"] for r in results]


def test_plain_list_with_a_shared_weight_is_tied(pool):
    tied = _check(pool.run("exact", model="plain", schedule="1f1b"))
    assert tied == {(0, 1)}


def test_what_cannot_be_tied_is_refused_naming_both_uses(pool):
    messages = pool.run("refused")[0]
    assert "'transformer.wte.weight'" in messages["asynchronous"]
    assert "'lm_head.weight'" in messages["asynchronous"]
    assert "schedule 'pipedream' updates each stage's weights inside the step" in messages["asynchronous"]
    assert "layer 0 (Embedding, stage 0) as '0.weight'" in messages["tensor parallel"]
    assert "layer 4 (Linear, stage 0) as '4.weight'" in messages["tensor parallel"]
    assert "tensor_parallel splits layer(s) [4]" in messages["tensor parallel"]
