"""The BENCHMARKS.md renderer on a synthetic results document."""

from benchmarks.harness.report import render_markdown, save_plots, table
from pipefold.schedule import build
from pipefold.simulate import CostModel, simulate


def _side(samples, disturbed=0, error=None, timeline=None):
    return {
        "label": "x",
        "samples_s": samples,
        "foreign_shares": [0.0] * len(samples),
        "num_disturbed": disturbed,
        "num_retakes": 0,
        "grad_max_abs_err": 1e-9,
        "peak_rss_bytes": [300 * 2**20, 310 * 2**20],
        "activation_bytes_peak": [8 * 2**20, 4 * 2**20],
        "error": error,
        "timeline": timeline,
    }


def _record(schedule, m, pipefold_s, torch_s, **extra):
    record = {
        "workload": "mlp",
        "schedule": schedule,
        "peer_schedule": "Schedule1F1B",
        "ranks": 2,
        "microbatches": m,
        "num_virtual": 1,
        "pipefold_step_s": pipefold_s,
        "peer_step_s": torch_s,
        "ratio": torch_s / pipefold_s,
        "efficiency": 0.8,
        "peer_efficiency": 0.7,
        "predicted_step_s": 0.2,
        "prediction_error": 0.2 / pipefold_s - 1,
        "pipefold_spread": 0.05,
        "peer_spread": 0.1,
        "predicted_activation_bytes_peak": [8 * 2**20, 4 * 2**20],
        "skipped": None,
        "sides": {"pipefold": _side([pipefold_s] * 3, disturbed=1), "torch": _side([torch_s] * 3)},
    }
    record.update(extra)
    return record


def _document(records):
    return {
        "command": "python benchmarks/run.py --quick",
        "started": "2026-11-28T01:00:00+00:00",
        "finished": "2026-11-28T01:01:00+00:00",
        "machine": {
            "cpu": "Test CPU", "num_cpus": 2, "torch": "2.13.0+cpu", "python": "3.11", "deepspeed": None
        },
        "options": {"warmup_steps": 1, "timed_steps": 3, "quiet_threshold": 0.1, "quiet_max_retries": 3},
        "baselines": {
            "mlp": {
                "accumulate": {"8": {"step_s": {"median": 0.3}, "num_threads": 1}},
                "full_batch": {"step_s": {"median": 0.2}, "num_threads": 2},
            }
        },
        "records": records,
    }


def test_table_shape():
    assert table(["a", "b"], [["1", "2"]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_render_has_header_tables_and_numbers():
    records = [_record("1f1b", 8, 0.25, 0.30), _record("gpipe", 8, 0.5, 0.4)]
    text = render_markdown(_document(records))
    assert "`python benchmarks/run.py --quick`" in text
    assert "Test CPU" in text and "torch 2.13.0+cpu" in text
    assert "## Workload: mlp" in text and "### 2 ranks" in text
    assert "| 1 process, 1 thread, M=8 accumulated | 0.300 |" in text
    assert "| 1f1b (Schedule1F1B) | 8 | 0.250 | 0.300 | 1.20 |" in text
    assert "| gpipe (Schedule1F1B) | 8 | 0.500 | 0.400 | 0.80 |" in text
    assert "-20%" in text  # 0.2 predicted vs 0.25 measured
    assert "1/6" in text  # one disturbed window out of six kept
    assert "| 1f1b | 8 | 300 / 310 | 300 / 310 | 8 / 4 | 8 / 4 |" in text
    assert "deepspeed s" not in text


def test_render_lists_refusals_and_deepspeed_column():
    refused = _record("dualpipe-v", 2, 0.25, 0.3, peer_step_s=None, ratio=None)
    refused["sides"]["torch"] = _side([], error="torch ScheduleDualPipeV needs microbatches >= 2 x ranks")
    with_ds = _record(
        "1f1b", 8, 0.25, 0.30, deepspeed_step_s=0.5, deepspeed_ratio=2.0, deepspeed_efficiency=0.3
    )
    text = render_markdown(_document([refused, with_ds]))
    assert "## Not measured" in text
    assert "mlp dualpipe-v p=2 M=2: torch: torch ScheduleDualPipeV needs" in text
    assert "deepspeed s" in text and "| 0.500 | 2.00 |" in text


def test_render_overhead_section():
    tiny = _record("1f1b", 64, 0.064, 0.128, workload="tiny", actions_per_rank=128,
                   pipefold_per_action_s=0.0005, peer_per_action_s=0.001)
    text = render_markdown(_document([tiny]))
    assert "## Per-action overhead" in text
    assert "| 1f1b | 2 | 64 | 128 | 500 | 1000 | 2.00 |" in text


def test_save_plots_writes_bar_chart_and_timeline_comparison(tmp_path):
    schedule = build("1f1b", num_ranks=2, num_microbatches=4)
    predicted = simulate(schedule, CostModel.uniform(2))
    record = _record("1f1b", 4, 0.25, 0.3, predicted_timeline=predicted.to_json())
    record["sides"]["pipefold"]["timeline"] = predicted.to_json()
    names = save_plots(_document([record]), tmp_path)
    assert names == ["step_time_mlp_p2.png", "timeline_mlp_1f1b_p2_m4.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    text = render_markdown(_document([record]), plots_link="plots", plot_files=names)
    assert "![step_time_mlp_p2](plots/step_time_mlp_p2.png)" in text


def test_efficiency_breakdown_factors_exactly_and_is_rendered():
    """gpipe p=2 m=4 with F=1, B=2 per stage: each rank computes 12 of a span of 15; with a
    one-process step of 20 and a median step of 16, the four factors multiply to 20 / 32."""
    import pytest

    from benchmarks.harness.breakdown import efficiency_breakdown

    schedule = build("gpipe", num_ranks=2, num_microbatches=4)
    measured = simulate(schedule, CostModel.uniform(2, f=1, b=2))
    record = _record("gpipe", 4, 16.0, 20.0, single_process_s=20.0, efficiency=20 / 32)
    record["sides"]["pipefold"]["timeline"] = measured.to_json()
    parts = efficiency_breakdown(record)
    assert parts["inflation"] == pytest.approx(20 / 24) and parts["balance"] == pytest.approx(1.0)
    assert parts["busy"] == pytest.approx(12 / 15) and parts["span_per_step"] == pytest.approx(15 / 16)
    product = parts["inflation"] * parts["balance"] * parts["busy"] * parts["span_per_step"]
    assert product == pytest.approx(parts["efficiency"]) == pytest.approx(20 / 32)
    text = render_markdown(_document([record]))
    assert "## Where the efficiency goes" in text
    assert "| mlp | 2 | 4 | gpipe | 0.62 | 0.83 | 1.00 | 0.80 | 0.94 |" in text
    assert efficiency_breakdown({**record, "sides": {}}) is None
