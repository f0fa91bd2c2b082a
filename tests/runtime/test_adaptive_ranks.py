"""The adaptive choice (`pipefold.runtime.adaptive`) with data-parallel replicas and tensor-parallel
peers: every pipeline measures its own steps, and every rank must still switch to the same choice
at the same step. One replica (or tp peer) is made slow while it runs the predicted best, so
without the agreement (`agreed_step_s`) the replicas would measure different steps and could keep
different choices; with it every rank observes the same step times and keeps the same choice, and
the run equals one process. Four ranks (the session's pool), rank-side functions in this module.
"""

from __future__ import annotations

import time

import pytest
import torch
from _cases import VOCAB
from _workers import WorkerPool

from pipefold.model import build_reference
from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.plan import gpt_costs
from pipefold.plan.adaptive import AdaptiveChoice, AdaptiveChooser, AdaptiveSpace
from pipefold.plan.tensor import split_costs
from pipefold.runtime import (
    LayoutOptions,
    ParallelOptions,
    Pipeline,
    RuntimeOptions,
    gpt_tensor_parallel_plan,
)
from pipefold.runtime.adaptive import AdaptiveRunner
from pipefold.simulate import Link

_LENGTH = 16
_ROWS = 8
_NUM_STEPS = 4
_SLOW_S = 0.03
"""What the slow replica (or tp peer) adds to each micro-batch's loss while it runs the best."""


@pytest.fixture(scope="module")
def pool4():
    pool = WorkerPool(4, cases=__name__)  # the ranks run this module's functions
    yield pool
    pool.close()


# -- rank side -------------------------------------------------------------------------------------


class _Recording(AdaptiveChooser):
    """An AdaptiveChooser that keeps what it was told."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[float] = []

    def observe(self, choice: AdaptiveChoice, step_s: float) -> None:
        self.seen.append(step_s)
        super().observe(choice, step_s)


def adaptive_agreement(*, dims):
    """pp=2 x dp=2 (`dims` ("dp", "pp")) or pp=2 x tp=2 (("pp", "tp")): 4 steps on one batch
    shape (trial_steps=1: the best, the runner-up, then the verdict's twice); the rank whose
    other coordinate is 1 is slow while it runs the best."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=dims)
    other = "tp" if "tp" in dims else "dp"
    tp = 2 if other == "tp" else 1
    coordinate = mesh.get_local_rank(other)

    def layers():
        return gpt_layers(VOCAB, 16, 4, 2, _LENGTH)

    state: dict[str, AdaptiveRunner] = {}

    def loss_fn(outputs, targets):
        runner = state["runner"]
        best = runner.chooser.ranked(_ROWS // (2 // tp), _LENGTH)[0]
        if coordinate == 1 and runner._running == (best.schedule, best.num_microbatches, best.recompute):
            time.sleep(_SLOW_S)
        return gpt_loss(outputs, targets)

    pipe = Pipeline(
        layers(),
        loss_fn=loss_fn,
        num_microbatches=4,
        layout=LayoutOptions(seed=7),
        parallel=ParallelOptions(
            process_group=mesh, tensor_parallel=gpt_tensor_parallel_plan() if tp > 1 else None
        ),
        runtime=RuntimeOptions(timeout_s=60),
    )

    def costs_at(length):
        costs = gpt_costs(num_layers=2, d_model=16, num_heads=4, seq_len=length, vocab_size=VOCAB)
        return split_costs(costs, tp, Link())

    space = AdaptiveSpace(
        num_ranks=2, num_virtual=1, bounds=tuple(pipe.partition.bounds), families=("1f1b", "gpipe", "zb-h1"),
        microbatch_counts=(1, 2, 4), trial_steps=1, num_data_parallel=pipe.num_data_parallel,
        num_tensor_parallel=tp,
    )
    chooser = _Recording(costs_at, space)
    runner = state["runner"] = AdaptiveRunner(pipe, chooser)
    reference = build_reference(layers(), seed=7)
    generator = torch.Generator().manual_seed(3)
    losses, choices = [], []
    for _ in range(_NUM_STEPS):
        inputs = torch.randint(0, VOCAB, (_ROWS, _LENGTH), generator=generator)
        targets = torch.randint(0, VOCAB, (_ROWS, _LENGTH), generator=generator)
        shard = torch.arange(_ROWS).tensor_split(pipe.num_data_parallel)[pipe.data_parallel_rank]
        loss = runner.step(inputs[shard], targets[shard])
        choices.append(runner.chooser.choose(len(shard), _LENGTH).label)
        expected = gpt_loss(reference(inputs), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        losses.append(loss)
    reference_params = dict(reference.named_parameters())
    for name, param in pipe.named_parameters():
        grad = param.grad
        if isinstance(grad, DTensor):  # a tensor-parallel shard: compare the whole
            grad = grad.full_tensor()
        torch.testing.assert_close(grad, reference_params[name].grad, msg=lambda m, n=name: f"{n}: {m}")
    return {
        "seen": chooser.seen, "choices": choices, "losses": losses, "coordinate": coordinate,
        "report": chooser.report(),
    }


# -- tests -----------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.parametrize("dims", [("dp", "pp"), ("pp", "tp")], ids=["dp2xpp2", "pp2xtp2"])
def test_every_rank_measures_the_same_steps_and_keeps_the_same_choice(pool4, dims):
    results = pool4.run("adaptive_agreement", dims=dims)
    seen = [r["seen"] for r in results]
    assert all(row == seen[0] for row in seen), f"ranks measured different steps: {seen}"
    assert all(r["choices"] == results[0]["choices"] for r in results), [r["choices"] for r in results]
    assert all(r["losses"] == results[0]["losses"] for r in results)
    # The agreed step is the slowest pipeline's: the slow one's sleeps are in the best's steps.
    report = results[0]["report"][0]
    assert report["settled"] and len(report["trial_s"]) == 2, report
    best_label = next(iter(report["trial_s"]))
    assert report["trial_s"][best_label] >= _SLOW_S, report
