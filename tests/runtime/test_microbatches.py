"""`Microbatches`: a step's micro-batches given one by one, each of its own shape (one process)."""

from __future__ import annotations

import pytest
import torch

from pipefold.errors import ConfigError
from pipefold.runtime import Microbatches
from pipefold.runtime.step_batch import split_batch
from pipefold.schedule import build

CPU = torch.device("cpu")


def _split(inputs, targets, num_microbatches=2):
    schedule = build("gpipe", num_ranks=1, num_microbatches=num_microbatches)
    return split_batch(0, schedule, inputs, targets, None, CPU)


def test_each_micro_batch_keeps_its_shape():
    xs = [torch.zeros(3, 8, dtype=torch.long), torch.zeros(1, 32, dtype=torch.long)]
    batch = _split(Microbatches(xs), Microbatches([x.clone() for x in xs]))
    assert batch.sizes == [3, 1] and batch.size == 4
    assert [part.shapes for part in batch.parts] == [((3, 8),), ((1, 32),)]
    assert [tuple(x.shape) for x in batch.inputs] == [(3, 8), (1, 32)]
    assert batch.key == batch.parts
    traced = batch.boundaries(lambda meta, rows: [meta, rows])
    assert traced == [[batch.parts[0], 3], [batch.parts[1], 1]]
    whole = _split(torch.zeros(4, 8), torch.zeros(4, 8))
    assert whole.parts is None and whole.sizes == [2, 2] and whole.key == whole.meta


@pytest.mark.parametrize(
    ("inputs", "targets", "message"),
    [
        (Microbatches([torch.zeros(2, 4)]), Microbatches([torch.zeros(2, 4)]),
         "1 parts but num_microbatches is 2"),
        (Microbatches([torch.zeros(2, 4), torch.zeros(0, 4)]), None, "at least one row"),
        (Microbatches([torch.zeros(2, 4), torch.zeros(1, 4)]), torch.zeros(3, 4), "both as Microbatches"),
        (torch.zeros(3, 4), Microbatches([torch.zeros(2, 4), torch.zeros(1, 4)]), "both as Microbatches"),
        (Microbatches([torch.zeros(2, 4), torch.zeros(1, 4)]),
         Microbatches([torch.zeros(1, 4), torch.zeros(2, 4)]),
         r"target micro-batches have \[1, 2\] rows"),
    ],
)
def test_refusals(inputs, targets, message):
    with pytest.raises(ConfigError, match=message):
        _split(inputs, targets)


def test_microbatches_needs_a_list():
    with pytest.raises(ConfigError, match="non-empty list"):
        Microbatches(torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="non-empty list"):
        Microbatches([])
