"""`pipefold plan --profile`'s calibration run: the profile priced at the stage costs a short run of
`pipefold train` measured (one 2-rank run of a tiny GPT), and its bad input refused before anything
runs."""

import json

import pytest

from pipefold.cli.main import main
from pipefold.plan import ModelCosts
from pipefold.plan.alike import alike_groups
from pipefold.plan.row_scales import row_scale
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.simulate import Link

TINY = ["--num-layers", "2", "--d-model", "32", "--num-heads", "2", "--seq-len", "16", "--batch-size", "8",
        "--ranks", "2", "--order-search", "0", "--repeats", "1", "--device", "cpu"]


def test_plan_profile_prices_the_layers_as_the_calibration_run_measured_them(tmp_path, capsys):
    saved = tmp_path / "costs.json"
    # A batch of 64: train's default 8 micro-batches have 8 rows, so the search's one-row size is
    # measured too, as 32 one-row micro-batches of the batch's first rows (the cap: not 64 of the
    # whole batch), in a pipeline built for 32 micro-batches that runs its own 8 first.
    at = TINY.index("--batch-size")
    argv = [*TINY[:at], "--batch-size", "64", *TINY[at + 2 :]]
    assert main(["plan", "--profile", *argv, "--calibrate-steps", "3", "--save-costs", str(saved),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    calibration = result["calibration"]
    assert calibration["ranks"] == 2 and calibration["steps"] == 3 and calibration["seconds"] > 0
    assert 0 < calibration["core_share"] <= 1.5  # CPU over wall seconds of rank 0
    # pipefold train's default: 8 micro-batches of the batch of 64, 8 rows each, on its own
    # partition; then 4 and 2 micro-batches, 32 of 2 rows, and 32 of one row, in the same launch.
    assert calibration["rows"] == 8 and calibration["bounds"][0] == 0 and len(calibration["bounds"]) == 3
    assert calibration["measured_rows"] == [8, 16, 32, 2, 1]
    assert calibration["sizes"] == ["8", "4", "2", "32", "32x1"]
    # Every wall step of the first size in order (3 steps are one block, its 2 warm-up steps
    # included); the median step is of the kept one.
    assert len(calibration["step_seconds"]) == 3 and min(calibration["step_seconds"]) > 0
    assert calibration["measured_step_s"] == pytest.approx(calibration["step_seconds"][2])
    profile = ModelCosts.from_json(calibration["profile_costs"])
    priced = ModelCosts.from_json(saved)
    # The two blocks, timed apart by the profile, are priced alike (pipefold.plan.alike).
    (blocks,) = alike_groups(profile)
    assert len(blocks) == 2 and profile.layers[blocks[0]] == profile.layers[blocks[1]]
    assert "calibrated on a 2-rank run of pipefold train's default" in priced.source
    assert result["source"] == priced.source
    # Each stage of the run's partition costs the line fitted through what the run measured, at
    # any rows, times the measured / line ratio there (interpolated between the measured sizes);
    # the scales say the run's F and B over the profile's at its first size.
    assert [entry[0] for entry in calibration["row_scales"]] == [1, 2, 8, 16, 32]
    assert priced.row_scales == tuple(tuple(entry) for entry in calibration["row_scales"])
    before = stage_cost_model(profile, StageLayout(tuple(calibration["bounds"]), 1), (), Link())
    for rows in (1, 3, 8):
        after = stage_cost_model(priced, StageLayout(tuple(calibration["bounds"]), rows), (), Link())
        f_scale, b_scale = row_scale(priced.row_scales, rows)
        for stage in range(2):
            fixed = calibration["fixed_s"][stage]
            shared = priced.overhead_s * (calibration["bounds"][stage + 1] - calibration["bounds"][stage])
            forward, backward = (fixed + rows * calibration[f"{kind}_s_per_row"][stage]
                                 for kind in ("forward", "backward"))
            # The line is of the layers' part (the runtime's seconds per layer apart), which is scaled.
            assert after.f[stage] == pytest.approx(shared + f_scale * forward)
            assert after.b[stage] == pytest.approx(shared + b_scale * backward)
    for stage in range(2):
        assert calibration["forward_scale"][stage] > 0 and calibration["backward_scale"][stage] > 0
        assert before.f[stage] > 0 and calibration["forward_s_per_row"][stage] >= 0
    assert calibration["fit_error"] >= 0 and calibration["tied_exchange_s"] >= 0
    assert priced.action_overhead_s == calibration["action_overhead_s"] > 0
    assert calibration["message_latency_s"] >= 0  # the plan's link: no --latency / --bandwidth given
    # The same launch ran 1F1B with each B as I then W on the same stages at the first size: the
    # split backward's I and W are priced as it measured them, B kept as fitted (I + W = B + the
    # layers' fixed seconds + 2 x the split's own per micro-batch and stage: a share of the stage's
    # backward work and seconds per action).
    assert priced.split_overhead_s == calibration["split_overhead_s"] >= 0
    assert priced.split_backward_share == calibration["split_backward_share"] >= 0
    assert len(calibration["weight_share"]) == 2 and all(0 <= x <= 1 for x in calibration["weight_share"])
    assert calibration["split_action_overhead_s"] > 0
    at_run = stage_cost_model(priced, StageLayout(tuple(calibration["bounds"]), 1), (), Link())
    for stage, (start, stop) in enumerate(
        zip(calibration["bounds"], calibration["bounds"][1:], strict=False)
    ):
        fixed = priced.overhead_s * (stop - start)
        assert at_run.i[stage] + at_run.w[stage] == pytest.approx(
            at_run.b[stage] + fixed + 2 * priced.split_overhead_s
            + 2 * priced.split_backward_share * (at_run.b[stage] - fixed))
    assert "split backward (1f1b+split at 8 rows)" in priced.source
    # The share priced is the block's pooled with the profile's own estimate (its I, W, B per layer).
    assert calibration["split_share_profile"] is not None
    assert calibration["split_backward_share"] == pytest.approx(
        (calibration["split_share_block"] + calibration["split_share_profile"]) / 2)
    # The second zb-h1 block (4 micro-batches of 16 rows, twice the first's) ran: a cap, or 0 for none.
    assert calibration["deferred_weight_most_s"] >= 0
    assert calibration["split_schedule"] == "1f1b+split"
    # On a CPU host the launch ran GPipe on the same stages too: the slope of an action's time per
    # activation byte its rank holds, fitted against the bytes each block held (the planner's model).
    assert len(calibration["held_bytes"]) == len(calibration["held_block_bytes"]) == 2
    assert all(g > o > 0 for g, o in zip(calibration["held_block_bytes"], calibration["held_bytes"],
                                         strict=True))
    # A curve through GPipe's ranks and zb-h1's (the curve block) that hold more than in 1F1B, each
    # layer against the bytes its own rank held in the run; the split block held 1F1B's bytes.
    assert calibration["held_split_bytes"] == calibration["held_bytes"]
    assert len(calibration["held_curve_block_bytes"]) == 2 and calibration["curve_drift"] > 0
    assert calibration["held_curve_block_bytes"][1] > calibration["held_bytes"][1]
    assert priced.held_curve == tuple(tuple(knot) for knot in calibration["held_curve"])
    assert priced.held_curve and all(f >= 1 and b >= 1 for _, f, b in priced.held_curve)
    bounds = calibration["bounds"]
    assert priced.held_reference_layer_bytes == tuple(
        float(calibration["held_bytes"][stage])
        for stage in range(2)
        for _ in range(bounds[stage], bounds[stage + 1])
    )
    # The held_forward_per_byte line is gone.
    assert priced.held_forward_per_byte == 0.0 and "held_forward_per_byte" not in calibration
    assert priced.held_reference_bytes == max(calibration["held_bytes"])
    assert "activations held (gpipe at 8 rows" in priced.source
    assert result["choice"]["step_time"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--profile", "--calibrate-steps", "2"], "--calibrate-steps = 2; give 3 or more"),
        (["--profile", "--calibrate-steps", "-1"], "--calibrate-steps = -1"),
        (["--model", "gpt", "--calibrate-steps", "4"], "--calibrate-steps calibrates measured costs"),
        (["--profile", "--vocab-size", "100", "--calibrate-steps", "4"], "vocabulary 256"),
    ],
)
def test_calibration_flags_are_refused_before_anything_runs(capsys, argv, message):
    assert main(["plan", *argv, *TINY]) == 2
    assert message in capsys.readouterr().err
