"""The planner and the simulator price the sum of a tied weight's gradient (the GPT's embedding and
head) between the pipeline ranks that hold it, after the flush, on the link between their devices,
as the runtime runs it (`pipefold.runtime.tied.TiedGradients.sum`). One process."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipefold.plan import LayerCost, ModelCosts, PlanOptions, plan
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.evaluate import evaluate
from pipefold.plan.hardware import load_hardware
from pipefold.plan.orders import family_placement, family_schedule
from pipefold.plan.result import Candidate
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, stage_cost_model
from pipefold.plan.topology import place
from pipefold.simulate import Link, predicted_step_time, simulate, step_end_time

A100 = load_hardware("a100-80gb")
TIED, BLOCK, OTHER = 1000, 100, 10
"""Bytes of the tied table (embedding = head), of a block, of the other layers."""
LINK = Link(latency=0.5, bandwidth=1e3)
BOUNDS = (0, 2, 4, 6, 8)


def costs_of(tied: bool = True, table: int = TIED, gradient: float = 1.0) -> ModelCosts:
    def layer(parameter_bytes: int) -> LayerCost:
        return LayerCost(forward_s=1.0, backward_s=2.0, activation_bytes=1, output_bytes=1,
                         parameter_bytes=parameter_bytes)

    layers = (layer(table), layer(OTHER), *[layer(BLOCK)] * 4, layer(OTHER), layer(table))
    return ModelCosts(layers=layers, tied_layers=((0, 7),) if tied else (),
                      gradient_bytes_per_parameter_byte=gradient)


def priced(costs: ModelCosts, schedule: str = "1f1b", num_ranks: int = 2, num_virtual: int = 1,
           bounds: tuple[int, ...] = (0, 4, 8), **kwargs: object) -> Candidate:
    return evaluate(costs, Config(schedule, num_virtual, 4, 1), num_ranks=num_ranks, bounds=bounds,
                    recompute=(), link=LINK, **kwargs)  # type: ignore[arg-type]


def test_a_tied_model_pays_the_exchange_after_the_flush_and_an_untied_one_does_not():
    tied, untied = priced(costs_of()), priced(costs_of(tied=False))
    assert untied.tied_exchange_s == 0
    assert tied.tied_exchange_s == pytest.approx(LINK.transfer_time(TIED))  # both ways at once
    assert tied.step_time == pytest.approx(untied.step_time + tied.tied_exchange_s)
    assert tied.pipeline_s == pytest.approx(untied.pipeline_s)
    assert tied.allreduce_s == untied.allreduce_s == 0  # not the replicas' all-reduce
    # In the gradient's dtype: fp32 gradients of 16-bit weights move twice the table.
    double = priced(costs_of(gradient=2.0))
    assert double.tied_exchange_s == pytest.approx(LINK.transfer_time(2 * TIED))
    # Serial with the replicas' all-reduce, which it precedes.
    replicas = priced(costs_of(), num_data_parallel=2, dp_link=Link(latency=1.0, bandwidth=1e3))
    assert replicas.step_time == pytest.approx(
        replicas.pipeline_s + replicas.allreduce_s + replicas.tied_exchange_s)
    assert replicas.tied_exchange_s == pytest.approx(tied.tied_exchange_s)
    # Full sharding: the owners sum their gradient shards, 1/dp of the table each.
    full = priced(costs_of(), num_data_parallel=2, dp_link=LINK, shard="full", price_exposure=False)
    assert full.tied_exchange_s == pytest.approx(LINK.transfer_time(TIED // 2))


def test_a_rank_holding_both_ends_pays_nothing():
    # zb-v at pp=2: rank 0 holds stage 0 (the embedding) and stage 3 (the head).
    v_shape = priced(costs_of(), "zb-v", num_virtual=2, bounds=BOUNDS)
    assert family_placement("zb-v", 2, 2) == (0, 1, 1, 0)
    assert v_shape.tied_exchange_s == 0
    # Interleaved at pp=2, v=2: stage 3 (the head) is on rank 1, so the ranks exchange.
    assert priced(costs_of(), "interleaved-1f1b", num_virtual=2, bounds=BOUNDS).tied_exchange_s > 0
    # One rank holding every layer.
    assert priced(costs_of(), num_ranks=1, bounds=(0, 8)).tied_exchange_s == 0


def test_bytes_scale_with_the_table():
    small, large = priced(costs_of(table=1000)), priced(costs_of(table=3000))
    assert (large.tied_exchange_s - LINK.latency) == pytest.approx(3 * (small.tied_exchange_s - LINK.latency))


def test_the_simulator_prices_the_same_step_end():
    costs = costs_of()
    schedule = family_schedule("1f1b", 2, 4, 1)
    model = stage_cost_model(costs, StageLayout((0, 4, 8), 1), (), LINK)
    assert step_end_time(schedule, model) == pytest.approx(LINK.transfer_time(TIED))
    makespan = simulate(schedule, model).makespan
    assert predicted_step_time(schedule, model) == pytest.approx(makespan + LINK.transfer_time(TIED))
    candidate = priced(costs)
    assert candidate.tied_exchange_s == pytest.approx(step_end_time(schedule, model))
    # Between synchronous steps too: the second step starts after the exchange.
    two = simulate(schedule, model, num_steps=2)
    untied = replace(model, tied_weights=())
    without = simulate(schedule, untied, num_steps=2).makespan
    assert two.makespan == pytest.approx(without + LINK.transfer_time(TIED))
    # Not for zb-v's rank 0, nor from a cost model round-tripped through JSON that keeps the ties.
    v_model = stage_cost_model(costs, StageLayout(BOUNDS, 1), (), LINK)
    assert step_end_time(family_schedule("zb-v", 2, 4, 2), v_model) == 0
    again = type(model).from_json(json.loads(json.dumps(model.to_json())))
    assert step_end_time(schedule, again) == step_end_time(schedule, model)


def _gpt(**kwargs: object) -> GptEstimate:
    sizes = {"num_layers": 4, "d_model": 1024, "num_heads": 8, "seq_len": 512, "vocab_size": 51200,
             "hardware": A100}
    return GptEstimate(**{**sizes, **kwargs})  # type: ignore[arg-type]


def _on(hardware: object, estimate: GptEstimate, num_ranks: int = 4, tp: int = 1) -> Candidate:
    links = place(hardware, num_data_parallel=1, num_ranks=num_ranks, num_tensor_parallel=tp,  # type: ignore[arg-type]
                  inner="pp")
    costs = estimate.at(1, tp, links.tensor_parallel, False)
    bounds = BOUNDS if num_ranks == 4 else (0, 4, 8)  # embedding, position, 4 blocks, norm, head
    assert len(costs.layers) == 8
    return evaluate(costs, Config("1f1b", 1, 4, 1), num_ranks=num_ranks, bounds=bounds, recompute=(),
                    link=links.pipeline, link_overrides=links.pipeline_overrides)


def test_first_and_last_rank_on_different_nodes_pay_the_inter_node_link():
    estimate = _gpt()
    table = 51200 * 1024 * estimate.gradient_element_bytes
    across = _on(replace(A100, devices_per_node=2), estimate)  # ranks 0-1 on node 0, 2-3 on node 1
    inside = _on(A100, estimate)  # one 8-device node
    assert across.tied_exchange_s == pytest.approx(A100.inter_node.transfer_time(table))
    assert inside.tied_exchange_s == pytest.approx(A100.intra_node.transfer_time(table))
    assert across.step_time - inside.step_time > across.tied_exchange_s - inside.tied_exchange_s - 1e-12


def test_bytes_scale_with_tensor_parallelism_where_the_table_is_split_by_vocabulary():
    hardware = replace(A100, devices_per_node=1)  # every device its own node: the ranks cross
    link = hardware.inter_node
    megatron = _gpt(megatron=True)
    one, two = _on(hardware, megatron, 2), _on(hardware, megatron, 2, tp=2)
    table = 51200 * 1024 * megatron.gradient_element_bytes
    assert one.tied_exchange_s == pytest.approx(link.transfer_time(table))
    assert two.tied_exchange_s == pytest.approx(link.transfer_time(table // 2))  # each tp rank its rows
    # The built-in GPT keeps the table whole on every tp rank: each exchanges all of it.
    builtin = _gpt()
    assert _on(hardware, builtin, 2, tp=2).tied_exchange_s == pytest.approx(
        link.transfer_time(51200 * 1024 * builtin.gradient_element_bytes))


def test_the_plan_shows_it_and_json_keeps_the_choice_fields():
    options = PlanOptions(num_ranks=4, global_batch=8, schedules=("1f1b",), order_search_s=0,
                          recompute="none", hardware=replace(A100, devices_per_node=2))
    result = plan(_gpt(), options)
    choice = result.choice
    assert choice.tied_exchange_s > 0
    assert choice.step_time == pytest.approx(choice.pipeline_s + choice.allreduce_s + choice.tied_exchange_s)
    assert "tied-gradient exchange" in result.explain()
    data = choice.to_json()
    assert data["tied_exchange_s"] == choice.tied_exchange_s
    assert Candidate.from_json(data).tied_exchange_s == choice.tied_exchange_s
    untied = plan(_gpt(tie_embeddings=False), options)
    assert untied.choice.tied_exchange_s == 0 and "tied-gradient" not in untied.explain()


def test_pipefold_simulate_agrees_with_the_planner(tmp_path, capsys):
    from pipefold.cli.main import main

    costs = costs_of()
    model = stage_cost_model(costs, StageLayout((0, 4, 8), 1), (), LINK)
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(model.to_json()))
    assert main(["simulate", "--schedule", "1f1b", "--ranks", "2", "--microbatches", "4",
                 "--costs-file", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tied_exchange_s"] == pytest.approx(LINK.transfer_time(TIED))
    assert summary["makespan"] + summary["tied_exchange_s"] == pytest.approx(priced(costs).step_time)


def test_the_owners_add_is_priced_at_the_memory_bandwidth():
    """Each owner reads both contributions and writes the sum (3 tables of traffic at 2 owners), at
    the device's memory bandwidth: the planner, the simulator and a cost model read back from JSON
    agree; the `cpu` preset prices its shared-memory copy and the add so."""
    bandwidth = 100.0
    added = priced(costs_of(), memory_bandwidth=bandwidth)
    assert added.tied_exchange_s == pytest.approx(LINK.transfer_time(TIED) + 3 * TIED / bandwidth)
    model = stage_cost_model(costs_of(), StageLayout((0, 4, 8), 1), (), LINK, memory_bandwidth=bandwidth)
    schedule = family_schedule("1f1b", 2, 4, 1)
    assert step_end_time(schedule, model) == pytest.approx(added.tied_exchange_s)
    again = type(model).from_json(json.loads(json.dumps(model.to_json())))
    assert again.tied_sum_bandwidth == bandwidth
    free = replace(model, tied_sum_bandwidth=float("inf"))
    assert type(model).from_json(json.loads(json.dumps(free.to_json()))).tied_sum_bandwidth == float("inf")
    cpu = load_hardware("cpu")
    estimate = GptEstimate(num_layers=2, d_model=256, num_heads=4, seq_len=64, vocab_size=4096, hardware=cpu)
    options = PlanOptions(num_ranks=2, global_batch=8, microbatches=4, schedules=("1f1b",), order_search_s=0,
                          recompute="none", hardware=cpu)
    table = 4096 * 256 * estimate.gradient_element_bytes
    assert plan(estimate, options).choice.tied_exchange_s == pytest.approx(
        cpu.intra_node.transfer_time(table) + 3 * table / cpu.memory_bandwidth)


def test_a_bad_sum_bandwidth_is_refused_naming_the_field():
    from pipefold.errors import CostModelError

    model = stage_cost_model(costs_of(), StageLayout((0, 4, 8), 1), (), LINK)
    for bad in (0.0, -1.0, True):
        with pytest.raises(CostModelError, match="tied_sum_bandwidth"):
            replace(model, tied_sum_bandwidth=bad)
