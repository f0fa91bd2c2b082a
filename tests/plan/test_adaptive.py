"""The adaptive chooser (pipefold.plan.adaptive): one process, no torch."""

from __future__ import annotations

import math

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import gpt_costs
from pipefold.plan.adaptive import AdaptiveChooser, AdaptiveSpace, BatchTooLong, length_bucket
from pipefold.plan.costs import ModelCosts
from pipefold.plan.search import evaluate
from pipefold.plan.space import Config

FAMILIES = ("gpipe", "1f1b", "zb-h1")


def _costs(length: int) -> ModelCosts:
    return gpt_costs(num_layers=4, d_model=64, num_heads=4, seq_len=length, flops=1e9, overhead_s=1e-5)


def _space(**changes: object) -> AdaptiveSpace:
    settings: dict[str, object] = {
        "num_ranks": 2, "num_virtual": 1, "bounds": (0, 3, 6), "families": FAMILIES,
        "microbatch_counts": (1, 2, 4, 8),
    }
    settings.update(changes)
    return AdaptiveSpace(**settings)  # type: ignore[arg-type]


def test_length_bucket():
    assert [length_bucket(n) for n in (1, 2, 3, 64, 65, 100, 128)] == [1, 2, 4, 64, 128, 128, 128]
    with pytest.raises(ConfigError, match="seq_len=0"):
        length_bucket(0)


def test_the_choice_is_the_fastest_that_fits_priced_at_the_bucket_length():
    space = _space(memory_limit=6e6)
    chooser = AdaptiveChooser(_costs, space)
    choice = chooser.choose(16, 27)  # bucket 32
    assert choice.bucket == 32 and choice.rows == 16
    # Every configuration of the space, priced on its own at length 32.
    fitting = []
    for m in space.microbatch_counts:
        for name in FAMILIES:
            for recompute in ("none", "full"):
                stages = (0, 1) if recompute == "full" else ()
                config = Config(name, 1, m, 16 // m)
                candidate = evaluate(_costs(32), config, 2, (0, 3, 6), stages, space.link)
                if candidate.peak_memory <= 6e6:
                    fitting.append(candidate.step_time)
    assert choice.predicted_step_s == min(fitting) and choice.peak_memory <= 6e6
    assert choice.num_microbatches * choice.microbatch_rows == 16


def test_costs_scale_with_length_attention_quadratically():
    chooser = AdaptiveChooser(_costs, _space())
    # The same tokens per step: longer rows cost more, by attention's T^2 term.
    times = [chooser.choose(rows, length).predicted_step_s for rows, length in ((64, 8), (8, 64), (2, 256))]
    assert times[0] < times[1] < times[2]
    costs8, costs256 = _costs(8), _costs(256)
    block8, block256 = costs8.layers[2].forward_s, costs256.layers[2].forward_s
    assert block256 / block8 > 256 / 8  # per sample: more than linear in the length


def test_buckets_are_cached_and_costs_taken_once_per_bucket():
    asked: list[int] = []

    def costs_at(length: int) -> ModelCosts:
        asked.append(length)
        return _costs(length)

    chooser = AdaptiveChooser(costs_at, _space())
    first = chooser.choose(8, 100)
    assert chooser.choose(8, 128) is first and chooser.choose(8, 65) is first
    chooser.choose(4, 100)  # other rows, same bucket: priced again, costs reused
    chooser.choose(8, 64)
    assert asked == [128, 64]


def test_a_tight_limit_moves_a_long_bucket_to_recomputation_and_short_ones_not():
    free = AdaptiveChooser(_costs, _space()).choose(1, 512)
    assert free.recompute == "none"
    # Below every choice without recomputation (their peaks differ: a schedule whose peak comes at
    # its first backward holds no gradient there).
    priced = AdaptiveChooser(_costs, _space()).priced(1, 512)
    limit = min(c.peak_memory for c in priced if c.recompute == "none") - 1
    chooser = AdaptiveChooser(_costs, _space(memory_limit=limit))
    long = chooser.choose(1, 512)  # one row: no more micro-batches to cut it into
    assert long.recompute == "full" and long.peak_memory <= limit
    short = chooser.choose(64, 8)
    assert short.recompute == "none" and short.peak_memory <= limit


def test_a_batch_that_fits_no_choice_is_refused_with_the_value_and_the_fix():
    leanest = min(
        (c for c in AdaptiveChooser(_costs, _space()).priced(1, 512)), key=lambda c: c.peak_memory
    )
    space = _space(memory_limit=leanest.peak_memory - 1, memory_hint="schedule.memory_limit")
    chooser = AdaptiveChooser(_costs, space)
    with pytest.raises(BatchTooLong, match=r"1 rows x seq_len=400 \(bucket 512\)") as error:
        chooser.choose(1, 400)
    text = str(error.value)
    assert "schedule.memory_limit" in text and f"({leanest.peak_memory} bytes)" in text
    assert "recompute=full" in text and "model.seq_len" in text
    assert isinstance(error.value, ConfigError)
    # At exactly the leanest choice's bytes it runs.
    assert AdaptiveChooser(_costs, _space(memory_limit=leanest.peak_memory)).choose(1, 400).peak_memory == (
        leanest.peak_memory
    )


def test_rows_no_count_divides_are_refused():
    with pytest.raises(ConfigError, match="rows"):
        AdaptiveChooser(_costs, _space(microbatch_counts=(2, 4))).choose(3, 8)


@pytest.mark.parametrize(("best_s", "runner_up_s", "kept"), [(0.1, 0.2, 0), (0.3, 0.2, 1)])
def test_the_measured_recheck_keeps_the_faster_of_the_two_best(best_s, runner_up_s, kept):
    chooser = AdaptiveChooser(_costs, _space(trial_steps=2))
    best = chooser.choose(16, 32)
    for _ in range(2):
        assert chooser.choose(16, 32) is best
        chooser.observe(best, best_s)
    runner_up = chooser.choose(16, 32)
    assert runner_up != best and runner_up.predicted_step_s >= best.predicted_step_s
    for _ in range(2):
        chooser.observe(chooser.choose(16, 32), runner_up_s)
    settled = chooser.choose(16, 32)
    assert settled == (best, runner_up)[kept]
    chooser.observe(settled, 5.0)  # settled: a slow step later does not reopen the trial
    assert chooser.choose(16, 32) == settled
    (row,) = chooser.report()
    assert row["bucket"] == 32 and row["rows"] == 16 and row["steps"] == 5 and row["settled"]
    assert row["choice"] == settled.label and row["runner_up"] == (runner_up, best)[kept].label
    assert row["measured_s"][best.label] == pytest.approx(best_s)
    assert row["trial_s"] == {best.label: best_s, runner_up.label: runner_up_s}


def test_no_recheck_with_zero_trial_steps():
    chooser = AdaptiveChooser(_costs, _space(trial_steps=0))
    best = chooser.choose(16, 32)
    for _ in range(5):
        chooser.observe(best, 1.0)
    assert chooser.choose(16, 32) is best and chooser.report()[0]["runner_up"] is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bounds": (0, 6)}, "bounds"),
        ({"families": ()}, "family"),
        ({"microbatch_counts": (0,)}, "microbatch_counts"),
        ({"recompute": ("some",)}, "recompute"),
        ({"trial_steps": -1}, "trial_steps"),
    ],
)
def test_a_bad_space_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        _space(**changes)


def test_unlimited_memory_never_recomputes():
    chooser = AdaptiveChooser(_costs, _space(memory_limit=math.inf))
    assert all(chooser.choose(rows, 8 * 64 // rows).recompute == "none" for rows in (1, 2, 8, 64))
