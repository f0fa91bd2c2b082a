"""benchmarks/split_price.py: one calibration run of the new layout priced both ways (the zb-h1
block as the split block, as before, and the 1f1b+split block)."""

import json

import pytest


def test_a_calibration_is_priced_with_either_block_as_the_split_block(tmp_path):
    from benchmarks.split_price import _priced
    from pipefold.plan import LayerCost, ModelCosts
    from pipefold.simulate import CostModel, Link

    layer = LayerCost(
        forward_s=0.01,
        backward_s=0.02,
        activation_bytes=2**20,
        output_bytes=1000,
        parameter_bytes=4000,
        weight_grad_s=0.01,
    )
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(ModelCosts(layers=(layer,) * 4, reference_rows=1).to_json()))

    def model(f, b, i=None, w=None):
        return CostModel.from_lists(
            list(f),
            list(i or [x / 2 for x in b]),
            list(w or [x / 2 for x in b]),
            b=list(b),
            action_overhead=50e-6,
            step_overhead=0.01,
            link=Link(latency=2e-4),
        ).to_json()

    run_f, run_b = (0.020, 0.021), (0.040, 0.041)
    # The split's own: 1 ms per I and W beyond B on the last stage; zb-h1's last rank holds more and
    # ran F 1.06x, I and W 1.10x what the split alone costs.
    split_i, split_w = (0.020, 0.0215), (0.020, 0.0215)
    calibration = {
        "partition": "[0:2 | 2:4]",
        "batch_size": 8,
        "phases": [
            {"num_microbatches": 8, "microbatch_rows": 1, "schedule": "1f1b", "costs": model(run_f, run_b)}
        ],
        "split_phase": {
            "num_microbatches": 8,
            "schedule": "1f1b+split",
            "split_stages": [1],
            "costs": model(run_f, run_b, split_i, split_w),
        },
        "curve_phase": {
            "num_microbatches": 8,
            "schedule": "zb-h1",
            "split_stages": [1],
            "costs": model(
                (run_f[0], run_f[1] * 1.06),
                run_b,
                (split_i[0], split_i[1] * 1.1),
                (split_w[0], split_w[1] * 1.1),
            ),
        },
        "held_phase": {
            "num_microbatches": 8,
            "schedule": "gpipe",
            "costs": model((run_f[0] * 1.10, run_f[1] * 1.20), (run_b[0] * 1.05, run_b[1] * 1.10)),
        },
    }
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    found = _priced(costs, path)
    # 1 ms per I and W on the last stage's backward work of 41 ms; no longer gaps between actions.
    assert found["1f1b+split"]["split_backward_share"] == pytest.approx(0.001 / 0.041)
    assert found["1f1b+split"]["split_overhead_us"] == pytest.approx(0.0)
    # The zb-h1 block's held slowdown beyond the curve's B factor lands in the split's share.
    assert found["zb-h1"]["split_backward_share"] > 1.5 * found["1f1b+split"]["split_backward_share"]
    assert found["zb-h1"]["curve"] == found["1f1b+split"]["curve"]  # one curve, the same points
    now, before = found["1f1b+split"]["families"]["1f1b"], found["zb-h1"]["families"]["1f1b"]
    assert now["b"] == pytest.approx(before["b"]) and now["w"][1] < before["w"][1]
