"""A tensor-parallel rank's 16-bit weight copies as the runtime's tp layers make them, against the
plan's split of the GPT's costs (one process: a fake two-rank process group, so each weight is a
real shard of the runtime's own split; the fake collectives move nothing, the shapes are exact)."""

import pytest
import torch
import torch.distributed as dist

from pipefold.model import build_reference
from pipefold.model.zoo import gpt_layers
from pipefold.plan import ModelCosts, gpt_costs
from pipefold.plan.tensor import split_costs, with_gpt_tensor_parallel
from pipefold.runtime import profile
from pipefold.runtime.held_copies import casts_kept, holding, is_weight_copy, measure_held_copies
from pipefold.runtime.parallel.plans import gpt_tensor_parallel_plan
from pipefold.runtime.parallel.tensor_parallel import apply_tensor_parallel, local
from pipefold.runtime.stage import Stage
from pipefold.simulate import Link

VOCAB, D, HEADS, SEQ, ROWS, TP = 64, 32, 2, 16, 2, 2
BLOCK = 2  # the first decoder block of `gpt_layers`


@pytest.fixture
def tp_mesh():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=TP)
    try:
        yield init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def _split_block(mesh):
    """The GPT's first block as a tp rank of `pipefold train --tensor-parallel TP` holds it."""
    layers = gpt_layers(VOCAB, D, HEADS, 1, SEQ)
    block = list(build_reference(layers, torch.device("cpu"), seed=0))[BLOCK]
    assert apply_tensor_parallel({BLOCK: block}, mesh["tp"], gpt_tensor_parallel_plan()) == 1
    stage = Stage(BLOCK, range(BLOCK, BLOCK + 1), layers[BLOCK:BLOCK + 1], [block], is_first=False,
                  is_last=False, recompute_all=False, recompute_layers=frozenset())
    stage.compute_dtype = torch.bfloat16
    return stage


def _saved_copy_bytes(stage):
    """Bytes of the weight copies a forward of `stage` saves for its backward (each storage once):
    what each micro-batch in flight keeps where no casts are held (full sharding)."""
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    ids = {id(p) for p in stage.parameters}
    with holding():  # (`is_weight_copy` tells a weight's cast apart only inside it)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            stage.forward(torch.randn(ROWS, SEQ, D, requires_grad=True), 0)  # casts made by this forward
        copies = {local(t).untyped_storage().data_ptr(): local(t).untyped_storage().nbytes()
                  for t in saved if is_weight_copy(t, ids)}
    return sum(copies.values())


def _held_copy_bytes(stage):
    """Bytes of the copies autocast's cache holds for `stage` once a step (the casts held)."""
    with casts_kept(), holding():
        stage.forward(torch.randn(ROWS, SEQ, D, requires_grad=True), 0)
        measure_held_copies([stage])
    return stage.held_cast_bytes


def test_a_tp_ranks_saved_block_copies_are_its_weight_shards_and_the_plan_prices_them(tp_mesh):
    stage = _split_block(tp_mesh)
    saved, held = _saved_copy_bytes(stage), _held_copy_bytes(stage)
    # The runtime's count, in the block's own shard shapes: every weight split TP ways, its copy saved.
    named = stage.modules[0].named_parameters()
    weights = [p for name, p in named if name.endswith("weight") and p.dim() > 1]
    assert saved == sum(local(p).numel() for p in weights) * 2 == 12 * D * D // TP * 2
    # The cache also holds the biases' copies: the column-split ones' shards, the row-split ones whole.
    assert held == saved + ((3 * D + 4 * D) // TP + 2 * D) * 2

    sizes = {"num_layers": 2, "d_model": D, "num_heads": HEADS, "seq_len": SEQ, "vocab_size": VOCAB}
    estimate = split_costs(gpt_costs(**sizes, bytes_per_value=2, parameter_bytes_per_value=4), TP, Link())
    layers = gpt_layers(VOCAB, D, HEADS, 2, SEQ)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    profiles = profile(layers, ids, num_repeats=1, precision="bf16")
    profiled = with_gpt_tensor_parallel(ModelCosts.from_profile(profiles, rows=1), num_layers=2, d_model=D,
                                        num_heads=HEADS)
    measured = split_costs(profiled, TP, Link())
    for costs in (estimate, measured):  # the FLOP estimate and `pipefold profile`'s costs, split
        for block in costs.layers[BLOCK:BLOCK + 2]:
            # What each micro-batch in flight keeps under full sharding: the weights' shards'
            # copies, not a share of the row-split biases that no backward saves.
            assert block.saved_casts == saved
            assert block.cast_bytes == held
