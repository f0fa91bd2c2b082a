"""What a recomputed stage keeps per micro-batch: each checkpointed layer's input, but none for a
layer whose forward saves nothing (torch's non-reentrant checkpoint holds its inputs only
through the saved tensors it packs)."""

from pipefold.plan import LayerCost, ModelCosts
from pipefold.plan.stages import StageLayout, stage_arrays

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
