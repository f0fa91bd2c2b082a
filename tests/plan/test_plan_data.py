"""ModelCosts, units, JSON round trips, the GPT estimate, and the torch-free import."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, Plan, PlanOptions, format_bytes, gpt_costs, parse_bytes, plan


def small_costs():
    layer = LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1000, output_bytes=100,
                      parameter_bytes=500)
    return ModelCosts(layers=(layer,) * 4, overhead_s=0.25, source="by hand")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 * 2**30), ("8 GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("1.5kib", 1536), ("4096", 4096),
     ("1e9", 10**9)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["8G", "eight GiB", "-1GiB", "0", "8 GiBs", ""])
def test_parse_bytes_refuses_naming_the_flag(text):
    with pytest.raises(ConfigError, match="--memory"):
        parse_bytes(text, what="--memory")


def test_format_bytes():
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(8 * 2**30) == "8 GiB"
    assert format_bytes(float("inf")) == "unlimited"


def test_model_costs_round_trip_through_a_file(tmp_path):
    costs = small_costs()
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(costs.to_json()))
    assert ModelCosts.from_json(path) == costs
    assert ModelCosts.from_json(costs.to_json()) == costs


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"layers": []}, "layers is empty"),
        ({"layers": [{"forward_s": 1}]}, r"missing field\(s\) \['activation_bytes', 'backward_s'"),
        ({"layers": [], "typo": 1}, r"unknown model costs field\(s\) \['typo'\]"),
        ({"layers": [{"forward_s": -1, "backward_s": 1, "activation_bytes": 0, "output_bytes": 0}]},
         "forward_s = -1"),
        ({"layers": [{"forward_s": 1, "backward_s": 1, "activation_bytes": 0, "output_bytes": 0,
                      "weight_grad_s": 2}]}, "weight_grad_s = 2 exceeds backward_s"),
    ],
)
def test_bad_model_costs_are_refused(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ModelCosts.from_json(data)


def test_from_profile_reads_layer_profiles_duck_typed():
    profile = SimpleNamespace(forward_s=0.5, backward_s=1.0, activation_bytes=800, parameter_bytes=64,
                              output=SimpleNamespace(num_bytes=32))
    costs = ModelCosts.from_profile([profile, profile], rows=4, weight_grad_share=0.25)
    assert costs.reference_rows == 4 and costs.num_layers == 2
    assert costs.layers[0].output_bytes == 32 and costs.layers[0].weight_s == 0.25
    assert costs.source == "measured profile"


def test_plan_json_round_trip():
    result = plan(small_costs(), PlanOptions(num_ranks=2, global_batch=4, memory_limit=20000))
    data = json.loads(json.dumps(result.to_json()))
    assert Plan.from_json(data) == result
    assert data["choice"]["pipeline_kwargs"]["schedule"] == result.choice.schedule
    unlimited = plan(small_costs(), PlanOptions(num_ranks=2, global_batch=4))
    assert unlimited.to_json()["memory_limit"] is None
    assert Plan.from_json(json.loads(json.dumps(unlimited.to_json()))) == unlimited


def test_gpt_estimate_counts_the_parameters_the_model_has():
    from pipefold.model import meta_layers
    from pipefold.model.zoo import gpt_layers

    costs = gpt_costs(num_layers=3, d_model=64, num_heads=4, seq_len=32, vocab_size=256, bytes_per_value=4)
    modules = meta_layers(gpt_layers(256, 64, 4, 3, 32))
    assert costs.num_layers == len(modules) == 7
    for layer, module in zip(costs.layers, modules, strict=True):
        assert layer.parameter_bytes == 4 * sum(p.numel() for p in module.parameters())
    assert "estimate" in costs.source


def test_plan_imports_no_torch():
    code = (
        "import sys\n"
        "from pipefold.plan import LayerCost, ModelCosts, PlanOptions, gpt_costs, plan\n"
        "costs = gpt_costs(num_layers=2, d_model=32, num_heads=2, seq_len=16)\n"
        "plan(costs, PlanOptions(num_ranks=2, global_batch=4))\n"
        "import pipefold.cli.plan\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
