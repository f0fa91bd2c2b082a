"""Autocast's held copies of tensor-parallel weights (DTensor shards): told apart from the
activations and measured per stage as a plain weight's are (one process, a one-rank mesh)."""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pipefold.runtime.held_copies import casts_kept, holding, measure_held_copies
from pipefold.runtime.memory import ActivationCounter

ROWS, IN, HIDDEN = 4, 8, 16


@pytest.fixture
def mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


def test_a_shards_cast_is_held_once_and_measured_not_counted_per_micro_batch(mesh):
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, IN))
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    parameters = tuple(model.parameters())
    assert all(isinstance(p, DTensor) for p in parameters)
    stage = SimpleNamespace(held_cast_bytes=None, compute_dtype=torch.bfloat16, device_type="cpu",
                            parameters=parameters)
    counter = ActivationCounter(parameters)
    sample = torch.randn(ROWS, IN)
    with counter.counting(), casts_kept(), holding():
        outputs = []
        for _ in range(2):  # two micro-batches: the second takes the first's cached casts
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outputs.append(model(sample.clone().requires_grad_(True)))
        counted = counter.current
        measure_held_copies([stage])
    # Each micro-batch's own activations (its bf16 input, the hidden and GELU values); no copy.
    per_microbatch = ROWS * IN * 2 + 2 * ROWS * HIDDEN * 2
    assert counted == 2 * per_microbatch
    # The shards' copies, weights and biases (the whole tensors on a one-rank mesh), once.
    assert stage.held_cast_bytes == (IN * HIDDEN + HIDDEN + HIDDEN * IN + IN) * 2
