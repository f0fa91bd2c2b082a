"""Per-rank bytes and the choice between replicate, ZeRO-1 and full sharding (one process, no torch).
The runtime's measured bytes are compared with `layout_bytes` in tests/runtime/test_data_parallel.py."""

from __future__ import annotations

import pytest

from pipefold.errors import ConfigError
from pipefold.plan.shard_layout import choose_layout, layout_bytes
from pipefold.schedule import add_sharding, build
from pipefold.simulate import CostModel, Link, simulate
from pipefold.simulate.memory import gathered_weight_bytes_peak

OWNED = 8 * 2**20


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_each_layout_divides_what_it_shards_by_dp(dp):
    plain = layout_bytes(OWNED, num_data_parallel=dp, layout="replicate")
    assert (plain.weights, plain.gradients, plain.optimizer) == (OWNED, OWNED, 2 * OWNED)
    if dp == 1:
        with pytest.raises(ConfigError, match="dp=1"):
            layout_bytes(OWNED, num_data_parallel=dp, layout="full")
        return
    zero = layout_bytes(OWNED, num_data_parallel=dp, layout="zero1")
    assert (zero.weights, zero.gradients, zero.optimizer) == (OWNED, OWNED, 2 * OWNED // dp)
    full = layout_bytes(OWNED, num_data_parallel=dp, layout="full")
    assert (full.weights, full.gradients, full.optimizer) == (OWNED // dp, OWNED // dp, 2 * OWNED // dp)
    # During the step: the shards, the whole weights gathered and the whole gradients.
    assert full.gathered == OWNED and full.step_peak == OWNED // dp + OWNED + OWNED + 2 * OWNED // dp
    assert full.at_rest < zero.at_rest < plain.at_rest
    assert plain.step_peak > full.step_peak
    # Gathered once per step, a rank holds its shards besides the whole weights: more than
    # ZeRO-1 at the step's peak, by the shards. Freed between micro-batches (half the whole
    # weights at a time, two stages per rank) it holds less from dp = 4 on.
    assert full.step_peak == zero.step_peak + OWNED // dp
    freed = layout_bytes(OWNED, num_data_parallel=dp, layout="full", gathered=OWNED // 2)
    assert (freed.step_peak < zero.step_peak) == (dp > 2)


def test_shards_round_up_and_gathered_comes_from_the_sharded_schedule():
    assert layout_bytes(7, num_data_parallel=2, layout="full").weights == 4
    schedule = build("interleaved-1f1b", num_ranks=2, num_microbatches=4, num_virtual=2)
    costs = CostModel.uniform(4, weight_bytes=OWNED // 2)
    once = gathered_weight_bytes_peak(simulate(add_sharding(schedule), costs), costs)[0]
    freed = gathered_weight_bytes_peak(simulate(add_sharding(schedule, free_between=True), costs), costs)[0]
    assert (once, freed) == (OWNED, OWNED // 2)
    full = layout_bytes(OWNED, num_data_parallel=2, layout="full", gathered=freed)
    assert full.step_peak == layout_bytes(OWNED, num_data_parallel=2, layout="full").step_peak - OWNED // 2


def test_communication_per_step_follows_the_ring_model():
    link = Link(latency=0.0, bandwidth=1e9)
    plain = layout_bytes(OWNED, num_data_parallel=4, layout="replicate", link=link)
    zero = layout_bytes(OWNED, num_data_parallel=4, layout="zero1", link=link)
    full = layout_bytes(OWNED, num_data_parallel=4, layout="full", link=link)
    assert plain.communication_s == pytest.approx(2 * 3 / 4 * OWNED / 1e9)
    assert zero.communication_s == pytest.approx(plain.communication_s + 3 / 4 * OWNED / 1e9)
    # An all-gather of the weights and a reduce-scatter of the gradients: the all-reduce's bytes.
    assert full.communication_s == pytest.approx(plain.communication_s)
    regathered = layout_bytes(OWNED, num_data_parallel=4, layout="full", link=link, gathers_per_step=3)
    assert regathered.communication_s == pytest.approx(full.communication_s + 2 * 3 / 4 * OWNED / 1e9)


def test_the_choice_is_the_first_layout_that_fits():
    half = OWNED // 2  # freed between micro-batches, two stages per rank
    plain = layout_bytes(OWNED, num_data_parallel=4, layout="replicate").step_peak
    zero = layout_bytes(OWNED, num_data_parallel=4, layout="zero1").step_peak
    full = layout_bytes(OWNED, num_data_parallel=4, layout="full", gathered=half).step_peak
    assert choose_layout(OWNED, num_data_parallel=4, memory_limit=plain)[0] == "replicate"
    chosen, why = choose_layout(OWNED, num_data_parallel=4, memory_limit=zero, gathered=half)
    assert chosen == "zero1" and "over the limit" in why["replicate"] and "not needed" in why["full"]
    assert choose_layout(OWNED, num_data_parallel=4, memory_limit=full, gathered=half)[0] == "full"
    # Gathered whole for the step, full sharding needs more than ZeRO-1 and is never the answer.
    assert choose_layout(OWNED, num_data_parallel=4, memory_limit=full)[0] is None
    chosen, why = choose_layout(OWNED, num_data_parallel=4, memory_limit=full - 1, gathered=half)
    assert chosen is None and all("over the limit" in reason for reason in why.values())
    # Activations count against the limit too; one replica can only replicate.
    assert choose_layout(OWNED, num_data_parallel=4, memory_limit=plain, activations=1)[0] == "zero1"
    assert choose_layout(OWNED, num_data_parallel=1, memory_limit=zero)[0] is None
