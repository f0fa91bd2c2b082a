"""`pipefold simulate` and `pipefold schedules`, run in-process through the real parser."""

import json
from fractions import Fraction

import pytest

from pipefold.cli.main import main


def run_json(capsys, *args):
    assert main(["simulate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_zb_h1_bubble_with_unit_costs(capsys):
    out = run_json(capsys, "--schedule", "zb-h1", "--ranks", "4", "--microbatches", "8")
    assert Fraction(out["bubble_fraction"]).limit_denominator(1000) == Fraction(3, 27)
    assert out["schedule"] == "zb-h1"
    assert len(out["peak_activations"]) == 4
    assert out["makespan"] == pytest.approx(27.0)


def test_gpipe_bubble_and_memory(capsys):
    out = run_json(capsys, "--schedule", "gpipe", "--ranks", "4", "--microbatches", "6", "--costs", "1,1,1")
    assert out["bubble_fraction"] == pytest.approx(3 / 9)
    assert out["peak_activations"] == [6, 6, 6, 6]


def test_costs_file(tmp_path, capsys):
    from pipefold.simulate import CostModel

    path = tmp_path / "costs.json"
    path.write_text(json.dumps(CostModel.uniform(2, f=2, i=1, w=1).to_json()))
    out = run_json(
        capsys, "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4", "--costs-file", str(path)
    )
    # 1F1B with F=2, B=2: (m + p - 1) * (F + B) = 5 * 4
    assert out["makespan"] == pytest.approx(20.0)


def test_chart_png_and_trace(tmp_path, capsys):
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    assert main(["simulate", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4",
                 "--png", str(png), "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "rank 0" in out and "bubble fraction" in out
    assert png.stat().st_size > 1000
    assert json.loads(trace.read_text())


def test_bad_schedule_is_a_clear_error(capsys):
    assert main(["simulate", "--schedule", "nope", "--ranks", "2", "--microbatches", "4"]) == 2
    assert "unknown schedule 'nope'" in capsys.readouterr().err


def test_bad_costs_refused(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--costs", "1,2"])
    assert "three non-negative numbers" in capsys.readouterr().err


def test_schedules_lists_every_family(capsys):
    from pipefold.schedule import names

    assert main(["schedules", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["name"] for row in rows] == names()
    assert all(row["bubble"] and row["legal"] for row in rows)


def test_ranks_sharing_cores(capsys):
    args = ("--schedule", "gpipe", "--ranks", "2", "--microbatches", "2", "--costs", "1,1,1")
    assert run_json(capsys, *args)["makespan"] == pytest.approx(9.0)
    # One core for both: the step is the total work, 2 x 2 x (1 + 2) (test_sim_engine.py has the spans).
    assert run_json(capsys, *args, "--cores", "1")["makespan"] == pytest.approx(12.0)
    assert run_json(capsys, *args, "--cores", "2")["makespan"] == pytest.approx(9.0)
    assert main(["simulate", *args, "--cores", "0"]) == 2
    assert "num_cores = 0" in capsys.readouterr().err


def test_stream_simulates_one_fill_and_one_drain_for_the_run(capsys):
    args = ["--schedule", "pipedream", "--ranks", "4", "--microbatches", "8", "--steps", "10"]
    streamed = run_json(capsys, *args, "--stream")
    flushed = run_json(capsys, "--schedule", "1f1b", *args[2:])
    assert streamed["bubble_fraction"] == pytest.approx(3 / 83)
    assert flushed["bubble_fraction"] == pytest.approx(3 / 11)
    assert main(["simulate", "--schedule", "1f1b", *args[2:], "--stream"]) == 2
    assert "schedule '1f1b' cannot stream" in capsys.readouterr().err
