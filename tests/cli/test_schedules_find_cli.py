"""`pipefold schedules find`, run in-process through the real parser."""

import json

from pipefold.cli.main import main
from pipefold.schedule import validate
from pipefold.schedule.io import load
from pipefold.simulate import CostModel, simulate

# Stage 1 costs 1.5x: the search reaches 37, the best family (zb-h1) 38 (see tests/schedule/test_auto.py).
SLOW_STAGE = CostModel.from_lists(f=[1, 1.5, 1, 1], i=[1, 1.5, 1, 1], w=[1, 1.5, 1, 1])


def test_find_from_a_cost_file_saves_a_loadable_schedule(tmp_path, capsys):
    costs, saved = tmp_path / "costs.json", tmp_path / "auto.json"
    costs.write_text(json.dumps(SLOW_STAGE.to_json()))
    assert main(["schedules", "find", "--ranks", "4", "--microbatches", "8", "--costs", str(costs),
                 "--time-budget", "0.5", "--save", str(saved), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    schedule = load(saved)
    validate(schedule)
    assert schedule.name == "auto" and out["actions"] == [[str(a) for a in row] for row in schedule.actions]
    assert out["makespan"] == simulate(schedule, SLOW_STAGE).makespan
    best = next(f for f in out["families"] if f["name"] == out["best_family"])
    assert best["fits"] and out["makespan"] < best["makespan"]
    assert max(out["peak_memory"]) <= out["memory_limit"] == 4
    assert out["memory_unit"] == "stage micro-batches"


def test_find_prints_the_grid_and_the_comparison(capsys):
    assert main(["schedules", "find", "--ranks", "3", "--microbatches", "6", "--costs", "1,1,1",
                 "--time-budget", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "rank 2" in out and "F0.0" in out
    assert "auto makespan" in out and "best fitting family" in out and "zb-h1" in out


def test_find_with_two_stages_per_rank_and_no_split(capsys):
    assert main(["schedules", "find", "--ranks", "2", "--microbatches", "4", "--virtual", "2",
                 "--no-split", "--time-budget", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["placement"] == "v"
    assert {cell[0] for row in out["actions"] for cell in row} == {"F", "B"}


def test_family_listing_still_works(capsys):
    assert main(["schedules", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0])["name"] == "naive"


def test_too_small_memory_limit_is_a_clear_error(capsys):
    assert main(["schedules", "find", "--ranks", "2", "--microbatches", "4", "--memory-limit", "0"]) == 2
    assert "memory_limit >= 1" in capsys.readouterr().err
