"""torch.compile per layer across ranks: zb-v and dualpipe-v on two processes (four stages, a
tied embedding / head on rank 0) with every layer compiled give the eager pipeline's losses and
every gradient, and each rank's split backward took the compiled path (`I` keeps the compiled
layers' weight gradients for `W`).

Two ranks start once for the module; one case runs both schedules on them, so each rank
compiles its layers once (the schedules share the compiled graphs). Compilation dominates the
cost (about 30 s on a quiet 2-core host)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _cases import _batch, _loss_fn, transformer
from _workers import WorkerPool

from pipefold.runtime import LayoutOptions, ParallelOptions, Pipeline, RuntimeOptions, executor
from pipefold.runtime.backward import backward_input

SCHEDULES = ("zb-v", "dualpipe-v")


@pytest.fixture(scope="module")
def pool2():
    pool = WorkerPool(2, cases=__name__)
    yield pool
    pool.close()


# -- rank side -------------------------------------------------------------------------------------


def _run(schedule: str, compiled: bool) -> tuple[list[float], dict[str, torch.Tensor], set[str]]:
    kind = "transformer"
    pipe = Pipeline(
        transformer(6), loss_fn=_loss_fn(kind), schedule=schedule, num_microbatches=4,
        layout=LayoutOptions(seed=3),
        parallel=ParallelOptions(process_group=dist.group.WORLD),
        runtime=RuntimeOptions(compile=compiled, fuse_backward=False, timeout_s=240),
    )
    ops = {action.op.value for row in pipe.schedule.actions for action in row}
    inputs, targets = _batch(kind, 4, seed=1)
    losses = [pipe.step(inputs, targets) for _ in range(2)]  # twice: the second reuses the graphs
    return losses, {name: p.grad.clone() for name, p in pipe.named_parameters()}, ops


def compiled_equals_eager() -> dict:
    kinds: list[str | None] = []

    def recording(*args, **kwargs):
        grads, state = backward_input(*args, **kwargs)
        kinds.extend(
            group.direct.kind if group.direct else None for group in state.groups if group.frontiers
        )
        return grads, state

    original = executor.backward_input
    found = {}
    for schedule in SCHEDULES:
        eager_losses, eager_grads, _ = _run(schedule, compiled=False)
        executor.backward_input = recording
        try:
            losses, grads, ops = _run(schedule, compiled=True)
        finally:
            executor.backward_input = original
        assert {"I", "W"} <= ops, (schedule, ops)  # the split backward really runs
        torch.testing.assert_close(losses, eager_losses)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad, eager_grads[name], msg=lambda m, s=schedule, n=name: f"{s} {n}: {m}"
            )
        found[schedule] = {"losses": losses, "kinds": list(kinds)}
        kinds.clear()
    return found


# -- tests -----------------------------------------------------------------------------------------


def test_compiled_v_schedules_equal_eager_on_two_ranks(pool2):
    results = pool2.run("compiled_equals_eager", timeout_s=400)
    for schedule in SCHEDULES:
        # The same global loss on both ranks.
        assert results[0][schedule]["losses"] == results[1][schedule]["losses"], schedule
        kinds = [kind for result in results for kind in result[schedule]["kinds"]]
        # Every split I reached compiled layers through the stage input and took the compiled path.
        assert kinds and all(kind == "compiled" for kind in kinds), (schedule, kinds)
