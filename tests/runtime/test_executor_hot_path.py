"""The executor's precomputed per-action data agrees with what it replaces (one process, no ranks)."""

from __future__ import annotations

import pytest
import torch

from pipefold.model import TensorMeta
from pipefold.runtime.executor_parts import consumer_names as _consumer_names
from pipefold.runtime.executor_parts import matches as _matches
from pipefold.schedule import Op, build, lower


@pytest.mark.parametrize(
    "outputs",
    [
        (torch.zeros(2, 3),),
        (torch.zeros(2, 4),),
        (torch.zeros(2, 3, dtype=torch.float64),),
        (torch.zeros(2, 3), torch.zeros(1)),
        (torch.zeros(3, 2),),
        (None,),
        ("not a tensor",),
    ],
)
@pytest.mark.parametrize(
    "expected",
    [
        TensorMeta.of(torch.zeros(2, 3)),
        TensorMeta.of((torch.zeros(2, 3),)),
        TensorMeta.of((torch.zeros(2, 3), torch.zeros(1))),
        TensorMeta.of((torch.zeros(2, 3), torch.zeros(1, dtype=torch.int64))),
    ],
)
def test_the_fast_output_check_never_passes_what_mismatch_refuses(expected, outputs):
    # The executor asks `mismatch` whenever `_matches` is False, so only a True here can
    # change its verdict; and the exact match, the common case, must take the fast path.
    slow = expected.mismatch(outputs if expected.is_tuple else outputs[0])
    if _matches(expected, outputs):
        assert slow is None
    exact = tuple(torch.empty(shape, dtype=dtype) for shape, dtype in zip(expected.shapes, expected.dtypes))
    assert _matches(expected, exact)


@pytest.mark.parametrize("family", ["gpipe", "1f1b", "zb-h1", "zb-v", "interleaved-1f1b"])
def test_every_receive_is_named_after_the_action_that_waits_for_it(family):
    num_virtual = 2 if family in ("zb-v", "interleaved-1f1b") else 1
    program = lower(build(family, num_ranks=2, num_microbatches=4, num_virtual=num_virtual))
    for actions in program.instructions:
        names = _consumer_names(actions)
        later = {str(a) for a in actions if a.op.is_compute}
        for action in actions:
            if action.op is Op.RECV_F:
                assert names[(action.op, action.stage, action.microbatch)] == f"F{action.stage}.{action.microbatch}"
            elif action.op is Op.RECV_B:
                name = names[(action.op, action.stage, action.microbatch)]
                assert name in later and name[0] in "BI" and name[1:] == f"{action.stage}.{action.microbatch}"
