"""Hardware files, the mesh placed on nodes, and what the GPT estimate prices on them (one process)."""

import json
import math
from dataclasses import replace

import pytest

from pipefold.cli.main import main
from pipefold.errors import ConfigError
from pipefold.plan import PlanOptions, plan
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.hardware import PRESETS, hardware_from_mapping, load_hardware
from pipefold.plan.topology import place
from pipefold.simulate import Link

A100 = load_hardware("a100-80gb")

GOOD = {
    "name": "toy", "devices_per_node": 4,
    "compute": {"default_dtype": "bf16", "memory_bandwidth": 1e12, "peak_flops": {"bf16": 1e14},
                "matmul": {"max_efficiency": 0.8, "half_flops": 1e9}},
    "memory": {"bytes": "16GiB", "reserve": "1GiB"},
    "links": {"intra_node": {"bandwidth": 1e11, "latency": 1e-6},
              "inter_node": {"bandwidth": 1e10, "latency": 1e-5}},
}


def _without(path):
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    del node[last]
    return data


def _with(path, value):
    data = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def test_presets_load_with_their_published_figures():
    assert set(PRESETS) == {"a100-80gb", "h100-80gb", "cpu"}
    assert (A100.peak("bf16"), A100.devices_per_node, A100.memory_bytes) == (312e12, 8, 80 * 2**30)
    assert A100.intra_node == Link(latency=5e-6, bandwidth=300e9)
    assert A100.inter_node.bandwidth == 25e9
    h100 = load_hardware("h100-80gb")
    assert h100.peak("bf16") == 989e12 and h100.inter_node.bandwidth == 50e9
    cpu = load_hardware("cpu")
    assert cpu.default_dtype == "fp32" and cpu.matmul.table
    for hardware in (A100, h100, cpu):
        assert 0 < hardware.usable_memory < hardware.memory_bytes
        assert hardware.source


def test_matmul_efficiency_curve_and_table():
    curve = A100.matmul
    assert curve(1.5e9) == pytest.approx(0.44)
    assert curve(1e8) < curve(1e10) < curve(1e13) < 0.88
    table = load_hardware("cpu").matmul
    first, last = table.table[0], table.table[-1]
    assert table(first[0] / 10) == first[1] and table(last[0] * 10) == last[1]
    (x0, y0), (x1, y1) = table.table[:2]
    assert table(math.sqrt(x0 * x1)) == pytest.approx((y0 + y1) / 2)  # log-linear


@pytest.mark.parametrize("path", ["name", "devices_per_node", "compute", "compute.peak_flops",
                                  "compute.memory_bandwidth", "compute.matmul", "compute.matmul.half_flops",
                                  "memory.bytes", "memory.reserve", "links.inter_node",
                                  "links.intra_node.bandwidth", "links.inter_node.latency"])
def test_missing_field_is_named(path):
    with pytest.raises(ConfigError, match=path.split(".")[-1]):
        hardware_from_mapping(_without(path), "toy.toml")


@pytest.mark.parametrize("path, value", [("compute.peak_flops.bf16", 0), ("compute.memory_bandwidth", -1.0),
                                         ("links.intra_node.bandwidth", 0), ("devices_per_node", 0),
                                         ("compute.matmul.max_efficiency", 1.5),
                                         ("links.inter_node.latency", -1),
                                         ("memory.reserve", "32GiB"), ("compute.default_dtype", "fp8")])
def test_bad_value_is_named_with_its_value(path, value):
    with pytest.raises(ConfigError) as error:
        hardware_from_mapping(_with(path, value), "toy.toml")
    message = str(error.value)
    assert "toy.toml" in message and path.split(".")[-1] in message


def test_devices_must_fill_whole_nodes():
    toy = hardware_from_mapping(GOOD)
    toy.check_devices(2)
    toy.check_devices(12)
    with pytest.raises(ConfigError, match=r"num_devices = 6 .* = 4; use whole nodes \(4 or 8\)"):
        PlanOptions(num_devices=6, global_batch=6, hardware=toy)


def test_hardware_refuses_links_of_its_own_and_sets_the_memory_limit():
    with pytest.raises(ConfigError, match="tp_link given with hardware"):
        PlanOptions(num_ranks=2, global_batch=4, hardware=A100, tp_link=Link(bandwidth=1e9))
    assert PlanOptions(num_ranks=2, global_batch=4, hardware=A100).memory_limit == 74 * 2**30


def test_tensor_parallel_inside_a_node_first():
    links = place(A100, num_data_parallel=2, num_ranks=4, num_tensor_parallel=8, inner="dp")
    assert links.tensor_parallel == A100.intra_node
    assert links.data_parallel == A100.inter_node and links.pipeline == A100.inter_node
    assert links.crossing == ("dp", "pp")
    # 2 x 4 fill a node: dp inside, every pipeline send between nodes.
    links = place(A100, num_data_parallel=4, num_ranks=4, num_tensor_parallel=2, inner="dp")
    assert (links.tensor_parallel, links.data_parallel, links.pipeline) == (
        A100.intra_node, A100.intra_node, A100.inter_node)
    # pp inside: ranks 0-3 on one node, 4-7 on the next; only 3 -> 4 (and the wrap 7 -> 0) cross.
    links = place(A100, num_data_parallel=2, num_ranks=8, num_tensor_parallel=2, inner="pp")
    assert links.pipeline == A100.intra_node
    assert dict(links.pipeline_overrides) == {(0, 7): A100.inter_node, (3, 4): A100.inter_node}
    assert links.data_parallel == A100.inter_node


def test_tp_group_spanning_nodes_pays_the_inter_node_link():
    assert place(A100, num_data_parallel=1, num_ranks=1, num_tensor_parallel=16).tensor_parallel == (
        A100.inter_node)
    estimate = GptEstimate(num_layers=4, d_model=4096, num_heads=32, seq_len=2048, vocab_size=51200,
                           hardware=A100, megatron=True)
    options = {"num_devices": 16, "num_ranks": 1, "tensor_parallel": 16, "global_batch": 1,
               "order_search_s": 0}
    spanning = plan(estimate, PlanOptions(**options, hardware=A100)).choice
    big_node = replace(A100, devices_per_node=16)
    inside = plan(replace(estimate, hardware=big_node), PlanOptions(**options, hardware=big_node)).choice
    assert "tp=16 across nodes" in spanning.placed and "tp=16 inside a node" in inside.placed
    # Every block all-reduces 2 x (forward + backward) its output over tp: the difference is those
    # all-reduces on 25 instead of 300 GB/s (and the latency), nothing else.
    sbh = 2048 * 4096 * 2
    def allreduce(link):
        return 2 * 15 / 16 * sbh / link.bandwidth + 2 * 15 * link.latency
    # 4 per block, 1 for the embedding, 1 for the head.
    extra = (4 * 4 + 2) * (allreduce(A100.inter_node) - allreduce(A100.intra_node))
    assert spanning.step_time - inside.step_time == pytest.approx(extra, rel=1e-6)


def test_pipeline_sends_across_nodes_cost_the_inter_node_link():
    estimate = GptEstimate(num_layers=16, d_model=2048, num_heads=16, seq_len=2048, vocab_size=51200,
                           hardware=A100, megatron=True)
    common = {"num_devices": 16, "num_ranks": 16, "tensor_parallel": 1, "global_batch": 16,
              "microbatches": 16, "schedules": ("1f1b",), "order_search_s": 0, "recompute": "none"}
    two_nodes = plan(estimate, PlanOptions(**common, hardware=A100)).choice
    big = replace(A100, devices_per_node=16)
    one_node = plan(replace(estimate, hardware=big), PlanOptions(**common, hardware=big)).choice
    assert "pp=16 across nodes" in two_nodes.placed and two_nodes.step_time > one_node.step_time


def test_korthikanti_activations_per_block():
    s, b, h, a = 2048, 2, 6144, 48
    estimate = GptEstimate(num_layers=2, d_model=h, num_heads=a, seq_len=s, vocab_size=51200, hardware=A100,
                           megatron=True)
    sbh = s * b * h
    assert estimate.block_activation_bytes(b, 1, False) == sbh * (34 + 5 * a * s / h)
    assert estimate.block_activation_bytes(b, 8, False) == sbh * (10 + 24 / 8 + 5 * a * s / (h * 8))
    assert estimate.block_activation_bytes(b, 8, True) == sbh / 8 * (34 + 5 * a * s / h)
    selective = estimate.attention_recomputed()
    assert selective.block_activation_bytes(b, 8, False) == sbh * (10 + 24 / 8)
    assert selective.block_activation_bytes(b, 8, True) == sbh * 34 / 8
    slower = selective.at(b, 8, Link(), False).layers[2].backward_s
    assert slower > estimate.at(b, 8, Link(), False).layers[2].backward_s


def test_vocabulary_parallel_embedding_and_head():
    kwargs = {"num_layers": 2, "d_model": 1024, "num_heads": 16, "seq_len": 1024, "vocab_size": 51200,
              "hardware": A100}
    megatron = GptEstimate(**kwargs, megatron=True).at(1, 8, A100.intra_node, False)
    builtin = GptEstimate(**kwargs).at(1, 8, A100.intra_node, False)
    assert megatron.layers[0].parameter_bytes == 51200 * 1024 // 8 * 2
    assert megatron.layers[-1].parameter_bytes == 51200 * 1024 // 8 * 2
    assert builtin.layers[-1].parameter_bytes == 51200 * 1024 * 2  # whole on every tp rank (the runtime)
    assert megatron.layers[-1].forward_s < builtin.layers[-1].forward_s / 4


def test_small_microbatches_run_below_peak():
    estimate = GptEstimate(num_layers=2, d_model=512, num_heads=8, seq_len=256, vocab_size=256, hardware=A100)
    one, eight = estimate.at(1, 1, Link(), False), estimate.at(8, 1, Link(), False)
    assert 8 * one.layers[2].forward_s > 1.5 * eight.layers[2].forward_s
    result = plan(estimate, PlanOptions(num_ranks=2, global_batch=64, order_search_s=0, schedules=("1f1b",)))
    assert result.choice.microbatch_rows > 1


def test_selective_recompute_is_searched_and_chosen_where_it_fits():
    estimate = GptEstimate(num_layers=8, d_model=1024, num_heads=16, seq_len=2048, vocab_size=51200,
                           hardware=A100, megatron=True)
    base = {"num_ranks": 2, "global_batch": 16, "order_search_s": 0, "schedules": ("1f1b",),
            "microbatches": 16}
    free = plan(estimate, PlanOptions(**base, recompute_attention=True)).choice
    assert not free.recompute_attention  # costs time, saves nothing needed
    needed = free.peak_memory
    tight = plan(estimate, PlanOptions(**base, recompute_attention=True, memory_limit=needed * 0.8)).choice
    assert tight.recompute_attention and tight.peak_memory <= needed * 0.8
    assert "attention core" in tight.recompute_text
    with pytest.raises(ConfigError, match="cannot price selective"):
        plan(estimate.base, PlanOptions(**base, recompute_attention=True))


def test_cli_hardware_keeps_the_choice_fields(capsys):
    assert main(["plan", "--model", "gpt", "--hardware", "a100-80gb", "--megatron", "--devices", "16",
                 "--max-tensor-parallel", "8", "--num-layers", "8", "--d-model", "2048", "--num-heads", "16",
                 "--seq-len", "2048", "--vocab-size", "51200", "--batch-size", "32", "--order-search", "0",
                 "--json"]) == 0
    choice = json.loads(capsys.readouterr().out)["choice"]
    for field in ("num_ranks", "num_tensor_parallel", "num_data_parallel", "num_microbatches",
                  "microbatch_rows", "step_time", "schedule", "recompute"):
        assert field in choice
    assert choice["num_tensor_parallel"] <= 8 and "mesh" in choice["placed"]


def test_cli_hardware_refusals(tmp_path, capsys):
    gpt = ["plan", "--model", "gpt", "--ranks", "2", "--batch-size", "8"]
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndevices_per_node = 8\n')
    for flags, message in (
        (["--hardware", "cpu", "--flops", "1e12"], "--flops and --hardware"),
        (["--hardware", "cpu", "--tp-bandwidth", "1e9"], "--tp-bandwidth given with --hardware"),
        (["--hardware", str(tmp_path / "none.toml")], "neither a preset"),
        (["--hardware", str(bad)], "compute is missing"),
        (["--megatron"], "--megatron shapes the estimate"),
    ):
        assert main([*gpt, *flags]) == 2
        assert message in capsys.readouterr().err


def test_the_loss_log_probabilities_stay_with_the_last_stage_when_it_recomputes():
    """The cross-entropy runs outside the stage's checkpoints, so its fp32 log-probabilities are
    `loss_bytes` (held recomputed or not), not the head's activations (dropped when recomputed)."""
    from pipefold.plan.evaluate import evaluate
    from pipefold.plan.space import Config

    rows, seq, dim, vocab = 2, 32, 64, 256
    estimate = GptEstimate(num_layers=2, d_model=dim, num_heads=4, seq_len=seq, vocab_size=vocab,
                           hardware=load_hardware("cpu"), dtype="fp32", megatron=True)
    costs = estimate.at(rows, 1, Link(), False)
    assert costs.loss_bytes == 4 * rows * seq * vocab
    assert costs.layers[-1].activation_bytes == 4 * rows * seq * dim  # the head's input only
    held = [evaluate(costs, Config("1f1b", 1, 4, rows), num_ranks=2, bounds=(0, 3, 6), recompute=stages,
                     link=Link()).memory[1].activations for stages in ((), (0, 1))]
    # Recomputed, the last rank keeps its layers' inputs and the loss's log-probabilities.
    assert held[1] == 3 * 4 * rows * seq * dim + costs.loss_bytes
    assert held[0] > held[1]
