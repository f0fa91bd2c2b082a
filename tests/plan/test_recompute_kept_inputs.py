"""What a recomputed stage keeps per micro-batch: each checkpointed layer's input, but none for a
layer whose forward saves nothing (torch's non-reentrant checkpoint holds its inputs only
through the saved tensors it packs)."""

from dataclasses import replace

import pytest

from pipefold.errors import ConfigError
from pipefold.plan import LayerCost, ModelCosts, gpt_costs
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.hardware import load_hardware
from pipefold.plan.stages import StageLayout, stage_arrays
from pipefold.plan.tensor import split_costs
from pipefold.simulate import Link

EMBEDDING = LayerCost(forward_s=1.0, backward_s=1.0, activation_bytes=10, output_bytes=300, parameter_bytes=8)
POSITION = LayerCost(forward_s=1.0, backward_s=1.0, activation_bytes=0, output_bytes=300, parameter_bytes=8)
BLOCK = LayerCost(forward_s=1.0, backward_s=1.0, activation_bytes=5000, output_bytes=300, parameter_bytes=8)


def test_a_layer_that_saves_nothing_keeps_no_input_under_its_checkpoint():
    costs = ModelCosts(layers=(EMBEDDING, POSITION, BLOCK), input_bytes=20, reference_rows=4)
    # The embedding keeps the ids (20), the position embedding nothing, the block its input (300).
    assert [costs.kept_input_bytes(i) for i in range(3)] == [20, 0, 300]
    layout = StageLayout(bounds=(0, 3), rows=8)  # twice the reference rows
    assert stage_arrays(costs, layout, recompute=[0]).activation_bytes.tolist() == [2 * (20 + 300)]
    assert stage_arrays(costs, layout, recompute=[]).activation_bytes.tolist() == [2 * (10 + 5000)]


def test_a_layer_that_saves_anything_keeps_its_whole_input():
    costs = ModelCosts(layers=(EMBEDDING, BLOCK, BLOCK), input_bytes=20, reference_rows=4)
    assert [costs.kept_input_bytes(i) for i in range(3)] == [20, 300, 300]


# Under autocast: the embeddings' fp32 stream (4 bytes a value inside a stage, 2 across a boundary),
# a block that passes on the dtype it is handed, and a norm that returns fp32 whatever it gets.
STREAM = LayerCost(forward_s=1.0, backward_s=1.0, activation_bytes=0, output_bytes=150,
                   stage_output_bytes=300)
PASSING = LayerCost(forward_s=1.0, backward_s=1.0, activation_bytes=5000, output_bytes=150,
                    stage_output_bytes=300, stage_output_bytes_from_boundary=150)
SETTING = LayerCost(forward_s=1.0, backward_s=1.0, activation_bytes=40, output_bytes=150,
                    stage_output_bytes=300)
MIXED = (EMBEDDING, STREAM, PASSING, PASSING, SETTING, PASSING, PASSING)


def test_a_stage_keeps_its_inputs_in_the_dtype_they_have_inside_it():
    costs = ModelCosts(layers=MIXED, input_bytes=20, reference_rows=4)
    # From the model's input: the embeddings' fp32 stream reaches every block (300 each).
    assert costs.stage_kept_input_bytes(0, 4) == [20, 0, 300, 300]
    # From a 16-bit boundary: the blocks pass it on (150), the norm returns fp32 (300 after it).
    assert costs.stage_kept_input_bytes(2, 7) == [150, 150, 150, 300, 300]
    assert costs.stage_kept_input_bytes(4, 7) == [150, 300, 300]
    assert costs.stage_kept_input_bytes(5, 7) == [150, 150]
    # The vectorized stage totals are the same sums, at the layout's rows.
    layout = StageLayout(bounds=(0, 2, 4, 6, 7), rows=8)
    kept = stage_arrays(costs, layout, recompute=range(4)).activation_bytes.tolist()
    bounds = layout.bounds
    assert kept == [2 * sum(costs.stage_kept_input_bytes(a, b))
                    for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def test_every_partition_totals_the_layers_kept_inputs():
    costs = ModelCosts(layers=MIXED, input_bytes=20, reference_rows=1)
    count = len(MIXED)
    for start in range(count):
        for stop in range(start + 1, count + 1):
            # The stage [start, stop) alone, or between two others where there is room.
            inside = 0 < start and stop < count
            layout = StageLayout(bounds=(0, start, stop, count) if inside else (start, stop), rows=1)
            stage = 1 if inside else 0
            kept = stage_arrays(costs, layout, recompute=[stage]).activation_bytes.tolist()[stage]
            assert kept == sum(costs.stage_kept_input_bytes(start, stop)), (start, stop)


def test_costs_without_in_stage_outputs_keep_the_boundary_sizes_as_before():
    plain = tuple(replace(layer, stage_output_bytes=None, stage_output_bytes_from_boundary=None)
                  for layer in MIXED)
    costs = ModelCosts(layers=plain, input_bytes=20, reference_rows=4)
    for start in range(len(plain)):
        later = [0 if not plain[j].activation_bytes else plain[j - 1].output_bytes
                 for j in range(start + 1, len(plain))]
        assert costs.stage_kept_input_bytes(start, len(plain)) == [costs.kept_input_bytes(start), *later]
    assert "stage_output_bytes" not in costs.to_json()["layers"][2]
    again = ModelCosts.from_json(ModelCosts(layers=MIXED, input_bytes=20).to_json())
    assert again.layers == MIXED


def test_a_bad_in_stage_output_is_refused_with_the_field():
    with pytest.raises(ConfigError, match="stage_output_bytes = -1"):
        replace(BLOCK, stage_output_bytes=-1)


def test_sequence_parallelism_splits_the_in_stage_output_as_the_boundary():
    marked = replace(PASSING, tensor_parallel_share=0.5, sequence_parallel_activation_share=1.0)
    split = split_costs(ModelCosts(layers=(EMBEDDING, marked)), 2, Link(), sequence_parallel=True).layers[1]
    sizes = (split.output_bytes, split.stage_output_bytes, split.stage_output_bytes_from_boundary)
    assert sizes == (75, 150, 75)
    whole = split_costs(ModelCosts(layers=(EMBEDDING, marked)), 2, Link()).layers[1]
    assert (whole.output_bytes, whole.stage_output_bytes, whole.stage_output_bytes_from_boundary) == (
        150, 300, 150)


@pytest.mark.parametrize(("device", "norm_from_boundary"), [("cpu", 2), ("cuda", 4)])
def test_the_gpt_estimate_under_autocast_keeps_the_fp32_stream_inside_a_stage(device, norm_from_boundary):
    # CPU's autocast leaves a layer norm in its input's dtype, CUDA's returns fp32.
    hardware = replace(load_hardware("a100-80gb"), device=device)
    estimate = GptEstimate(num_layers=2, d_model=64, num_heads=4, seq_len=32, vocab_size=256,
                           hardware=hardware, dtype="bf16", parameter_bytes=4)
    embed, position, block, _, norm, head = estimate.at(2, 1, Link(), False).layers
    stream = 2 * 32 * 64
    assert (block.output_bytes, block.stage_output_bytes, block.stage_output_bytes_from_boundary) == (
        stream * 2, stream * 4, stream * 2)
    assert embed.stage_output_bytes == position.stage_output == position.stage_output_from_boundary
    assert position.stage_output == norm.stage_output_bytes == stream * 4
    assert norm.stage_output_from_boundary == stream * norm_from_boundary
    # bf16 weights cast nothing: one dtype throughout, as before.
    pure = GptEstimate(num_layers=2, d_model=64, num_heads=4, seq_len=32, vocab_size=256,
                       hardware=hardware, dtype="bf16").at(2, 1, Link(), False)
    assert all(layer.stage_output_bytes is None for layer in pure.layers) and head.stage_output_bytes is None


def test_the_flop_estimate_under_autocast_keeps_the_fp32_stream_inside_a_stage():
    mixed = gpt_costs(num_layers=2, d_model=64, num_heads=4, seq_len=32, bytes_per_value=2,
                      parameter_bytes_per_value=4)
    # Rank 0 of a 2-stage cut after the first block: the block's fp32 input (the estimate's
    # embeddings save nothing, so keep no input).
    assert mixed.stage_kept_input_bytes(0, 3) == [0, 0, 32 * 64 * 4]
    # A stage from a 16-bit boundary: blocks pass 16 bits on, the norm returns fp32.
    assert mixed.stage_kept_input_bytes(3, 6) == [32 * 64 * 2, 32 * 64 * 2, 32 * 64 * 4]
    fp32 = gpt_costs(num_layers=2, d_model=64, num_heads=4, seq_len=32)
    assert all(layer.stage_output_bytes is None for layer in fp32.layers)


def test_layers_handed_a_16_bit_boundary_save_what_they_save_from_it():
    # The blocks save 4000 from a 16-bit stream (their layer norms' inputs in 16 bits on CPU).
    passing = replace(PASSING, activation_bytes_from_boundary=4000)
    setting = replace(SETTING, activation_bytes_from_boundary=20)
    layers = (EMBEDDING, STREAM, passing, passing, setting, passing, passing)
    costs = ModelCosts(layers=layers, input_bytes=20, reference_rows=4)
    # The first stage starts from the model's input: the profile's chain throughout.
    assert costs.stage_activation_bytes(0, 4) == [10, 0, 5000, 5000]
    # From a boundary: the blocks and the norm are handed 16 bits; after the norm, fp32 again.
    assert costs.stage_activation_bytes(2, 7) == [4000, 4000, 20, 5000, 5000]
    assert costs.stage_activation_bytes(5, 7) == [4000, 4000]
    layout = StageLayout(bounds=(0, 2, 5, 7), rows=8)
    kept = stage_arrays(costs, layout, recompute=[]).activation_bytes.tolist()
    assert kept == [2 * 10, 2 * (4000 + 4000 + 20), 2 * (4000 + 4000)]
    # Split by tp as the chain's activations are, less the whole stream's 1000 (the norms' inputs,
    # which tp keeps whole and sequence parallelism splits by position).
    marked = replace(passing, tensor_parallel_share=0.5, sequence_parallel_activation_share=1.0)
    split = split_costs(ModelCosts(layers=(EMBEDDING, marked)), 2, Link()).layers[1]
    assert (split.activation_bytes, split.activation_bytes_from_boundary) == (3750, 3750 - 1000)
    split = split_costs(ModelCosts(layers=(EMBEDDING, marked)), 2, Link(), sequence_parallel=True).layers[1]
    assert (split.activation_bytes, split.activation_bytes_from_boundary) == (2500, 2500 - 500)
