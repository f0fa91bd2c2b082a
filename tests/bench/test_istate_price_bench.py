"""benchmarks/istate_price.py: one calibration run priced both ways (the zb-h1 block as a knot of
the bytes curve, as main prices it, and as the I-state term)."""

import json

import pytest


def _calibration(tmp_path, forward_scales=(1.0, 1.0, 1.0, 1.0), fixed_s=0.0):
    """A stored calibration of 1F1B's [2, 2] over four identical layers, and the profile's costs
    path, its layers' forward and fixed seconds (`fixed_s` each) scaled by `forward_scales` (a
    profile's noise)."""
    from dataclasses import replace

    from pipefold.plan import LayerCost, ModelCosts
    from pipefold.simulate import CostModel, Link

    layer = LayerCost(
        forward_s=0.01,
        backward_s=0.02,
        activation_bytes=2**20,
        output_bytes=1000,
        parameter_bytes=4000,
        weight_grad_s=0.01,
        fixed_s=fixed_s,
    )
    layers = tuple(
        replace(layer, forward_s=layer.forward_s * k, fixed_s=layer.fixed_s * k) for k in forward_scales
    )
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(ModelCosts(layers=layers, reference_rows=1).to_json()))

    def model(f, b):
        return CostModel.from_lists(
            list(f),
            [x / 2 for x in b],
            [x / 2 for x in b],
            b=list(b),
            action_overhead=50e-6,
            step_overhead=0.01,
            link=Link(latency=2e-4),
        ).to_json()

    run_f, run_b = (0.020, 0.021), (0.040, 0.041)
    phase = {"num_microbatches": 8, "microbatch_rows": 1}
    calibration = {
        "partition": "[0:2 | 2:4]",
        "batch_size": 8,
        "phases": [{**phase, "schedule": "1f1b", "costs": model(run_f, run_b)}],
        "split_phase": {**phase, "schedule": "1f1b+split", "split_stages": [1], "costs": model(run_f, run_b)},
        # zb-h1's last rank: F 1.12x (one I state held at 7 of its 8 F); GPipe's ranks F 1.10x / 1.20x.
        "curve_phase": {
            **phase,
            "schedule": "zb-h1",
            "split_stages": [1],
            "costs": model((run_f[0], run_f[1] * 1.12), run_b),
        },
        "held_phase": {
            **phase,
            "schedule": "gpipe",
            "costs": model((run_f[0] * 1.10, run_f[1] * 1.20), (run_b[0] * 1.05, run_b[1] * 1.10)),
        },
    }
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    return costs, path


def test_a_calibration_is_priced_by_bytes_and_by_i_states(tmp_path):
    from benchmarks.istate_price import _priced

    found = _priced(*_calibration(tmp_path))
    assert found["bytes"]["state_forward"] == 0.0
    assert found["states"]["state_forward"] > 0.0
    # By bytes the zb-h1 point is a knot below GPipe's; by states the curve is GPipe's alone.
    assert len(found["bytes"]["curve"]) == len(found["states"]["curve"]) + 1
    knots, gpipe = found["bytes"]["curve"], found["states"]["curve"]
    assert [knot[0] for knot in knots[1:]] == [knot[0] for knot in gpipe]
    assert [knot[1] for knot in gpipe] == pytest.approx([1.10, 1.20])  # GPipe's own F ratios
    assert knots[0][1] > 1.10  # zb-h1's 1.12 pooled with GPipe's 1.10 (the monotone fit)


def test_identical_blocks_share_a_calibrated_stage_alike(tmp_path):
    """As `pipefold plan --profile`: the profile's noise between identical blocks (layer 0 timed
    1.4x layer 1) does not move a calibrated stage's F between the stages that would cut it."""
    from benchmarks.istate_price import _priced
    from pipefold.plan import ModelCosts

    found = _priced(*_calibration(tmp_path, (1.4, 1.0, 0.8, 1.1), fixed_s=0.001))
    for way in ("bytes", "states"):
        layers = ModelCosts.from_json(found[way]["costs"]).layers
        for stage in ((0, 1), (2, 3)):
            first, second = (layers[index] for index in stage)
            assert first.forward_s == pytest.approx(second.forward_s)
            assert first.fixed_s == pytest.approx(second.fixed_s)
