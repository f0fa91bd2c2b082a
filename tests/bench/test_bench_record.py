"""How one configuration's record joins measurements, baselines and the prediction."""

import pytest

from benchmarks.harness.baseline import BaselineResult
from benchmarks.harness.results import BenchConfig, ConfigResult, LayerCost, SideResult
from benchmarks.harness.runner import Baselines, build_record
from pipefold.errors import ConfigError


def _baselines(m):
    return Baselines(
        accumulate={m: BaselineResult(m, 1, samples_s=[0.9, 1.0, 1.1])},
        full_batch=BaselineResult(1, 2, samples_s=[0.5]),
        layer_costs={m: [LayerCost(0.01, 0.02, 0.01, 1000, 64) for _ in range(8)]},
    )


def test_ratio_efficiency_and_prediction():
    config = BenchConfig("mlp", "1f1b", 2, 4)
    result = ConfigResult(
        config,
        sides={
            "pipefold": SideResult("pipefold", samples_s=[0.6, 0.5, 0.7]),
            "torch": SideResult("torch", samples_s=[0.75, 0.8, 0.7]),
        },
    )
    record = build_record(result, _baselines(4), link={"latency_s": 0.0, "bandwidth_bytes_per_s": 1e12})
    assert record["pipefold_step_s"] == 0.6 and record["peer_step_s"] == 0.75
    assert record["ratio"] == pytest.approx(0.75 / 0.6)
    assert record["efficiency"] == pytest.approx(1.0 / (2 * 0.6))
    assert record["peer_efficiency"] == pytest.approx(1.0 / (2 * 0.75))
    assert record["single_process_s"] == 1.0 and record["full_batch_s"] == 0.5
    # Calibrated to the 1.0 s baseline, a stage's F + B of one micro-batch is 1.0 / (4 x 2) s;
    # 1F1B with p=2, m=4 and free links takes (m + p - 1) of those: 0.625 s.
    assert record["predicted_step_s"] == pytest.approx(0.625, rel=1e-3)
    assert record["prediction_error"] == pytest.approx(0.625 / 0.6 - 1, rel=1e-3)
    assert record["actions_per_rank"] == 8
    assert record["peer_per_action_s"] == pytest.approx(0.75 / 8)


def test_missing_peer_leaves_ratio_empty():
    config = BenchConfig("mlp", "dualpipe-v", 2, 2)
    result = ConfigResult(
        config,
        sides={
            "pipefold": SideResult("pipefold", samples_s=[0.5]),
            "torch": SideResult("torch", error="torch ScheduleDualPipeV needs microbatches >= 2 x ranks"),
        },
    )
    record = build_record(result, _baselines(2))
    assert record["peer_step_s"] is None and record["ratio"] is None and record["peer_efficiency"] is None
    assert record["efficiency"] == pytest.approx(1.0)


def test_interleaved_baseline_is_the_efficiency_numerator():
    config = BenchConfig("mlp", "1f1b", 2, 4)
    result = ConfigResult(
        config,
        sides={
            "pipefold": SideResult("pipefold", samples_s=[0.6]),
            "torch": SideResult("torch", samples_s=[0.75]),
            "one-process": SideResult("one-process", samples_s=[1.3, 1.2, 1.4]),
        },
    )
    record = build_record(result, _baselines(4))
    assert record["single_process_source"] == "interleaved"
    assert record["single_process_s"] == 1.3 and record["single_process_before_s"] == 1.0
    assert record["efficiency"] == pytest.approx(1.3 / (2 * 0.6))
    assert record["peer_efficiency"] == pytest.approx(1.3 / (2 * 0.75))
    assert record["ratio"] == pytest.approx(0.75 / 0.6)


def test_a_searched_row_is_predicted_from_the_schedule_that_ran_and_has_no_peer():
    from pipefold.schedule import build
    from pipefold.schedule.io import to_json

    # What the side records: the searched schedule (here zb-h1's order stands in for it).
    ran = build("zb-h1", num_ranks=2, num_microbatches=4)
    config = BenchConfig("mlp", "auto", 2, 4)
    side = SideResult("pipefold", samples_s=[0.6], schedule=to_json(ran))
    result = ConfigResult(config, sides={"pipefold": side})
    record = build_record(result, _baselines(4))
    assert record["peer_schedule"] is None and record["ratio"] is None
    assert record["searched_schedule"] == "zb-h1"
    assert record["efficiency"] == pytest.approx(1.0 / (2 * 0.6))
    assert record["actions_per_rank"] == max(len(row) for row in ran.actions)
    # Without the recorded schedule there is nothing to predict (and no guess is made).
    bare = ConfigResult(config, sides={"pipefold": SideResult("pipefold", samples_s=[0.6])})
    assert build_record(bare, _baselines(4))["predicted_step_s"] is None


def test_pipefold_only_rows_are_refused_for_torch():
    from benchmarks.harness.pairs import pair

    assert pair("auto").peer_refusal(2, 8) is not None and pair("auto-v").num_virtual == 2
    with pytest.raises(ConfigError, match="not a benchmark row"):
        pair("nope")
