"""`pipefold.runtime.adaptive.AdaptiveRunner` in one process: switching micro-batches, family and
recomputation between steps keeps every loss and gradient equal to the one-process model."""

from __future__ import annotations

import pytest
import torch

from pipefold import Pipeline
from pipefold.errors import ConfigError
from pipefold.model import build_reference
from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.plan import gpt_costs
from pipefold.plan.adaptive import AdaptiveChoice, AdaptiveChooser, AdaptiveSpace, length_bucket
from pipefold.runtime import LayoutOptions
from pipefold.runtime.adaptive import AdaptiveRunner
from pipefold.schedule import build

_SPACE = AdaptiveSpace(
    num_ranks=1, num_virtual=1, bounds=(0, 6), families=("gpipe", "1f1b", "zb-h1"),
    microbatch_counts=(1, 2, 4),
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread (two threads contend for a loaded host's cores, ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Scripted(AdaptiveChooser):
    """Returns the given (family, micro-batches, recompute) in turn, whatever the shape."""

    def __init__(self, script: list[tuple[str, int, str]]) -> None:
        super().__init__(lambda n: gpt_costs(num_layers=2, d_model=16, num_heads=2, seq_len=n), _SPACE)
        self.script = script
        self.seen: list[float] = []

    def choose(self, rows: int, seq_len: int) -> AdaptiveChoice:
        name, m, recompute = self.script[len(self.seen)]
        return AdaptiveChoice(rows, length_bucket(seq_len), name, m, rows // m, recompute, 0.0, 0, 0)

    def observe(self, choice: AdaptiveChoice, step_s: float) -> None:
        self.seen.append(step_s)


def _layers():
    return gpt_layers(256, 16, 2, 2, seq_len=32)


def test_each_step_runs_as_chosen_and_equals_one_process():
    script = [("1f1b", 4, "none"), ("gpipe", 2, "full"), ("zb-h1", 1, "none"), ("zb-h1", 4, "full"),
              ("1f1b", 4, "none"), ("1f1b", 4, "none")]
    pipe = Pipeline(_layers(), loss_fn=gpt_loss, num_microbatches=4, layout=LayoutOptions(seed=5))
    reference = build_reference(_layers(), seed=5)
    chooser = _Scripted(script)
    runner = AdaptiveRunner(pipe, chooser)
    generator = torch.Generator().manual_seed(0)
    switched = []
    for (name, m, recompute), length in zip(script, (8, 32, 16, 32, 8, 8), strict=True):
        inputs = torch.randint(0, 256, (8, length), generator=generator)
        targets = torch.randint(0, 256, (8, length), generator=generator)
        choice = runner.prepare(inputs)
        switched.append(runner.switched)
        assert (pipe.schedule.name, pipe.schedule.num_microbatches) == (name, m)
        assert all(stage.recomputes == (recompute == "full") for stage in pipe.stages)
        loss = pipe.step(inputs, targets)
        runner.finish(choice)
        expected = gpt_loss(reference(inputs), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        grads = dict(reference.named_parameters())
        for param_name, param in pipe.named_parameters():
            torch.testing.assert_close(param.grad, grads[param_name].grad, rtol=1e-4, atol=1e-6)
            param.grad = None
        reference.zero_grad(set_to_none=True)
    assert len(chooser.seen) == len(script) and all(seconds > 0 for seconds in chooser.seen)
    assert switched == [True] * 5 + [False]


def test_the_real_chooser_drives_a_pipeline():
    pipe = Pipeline(_layers(), loss_fn=gpt_loss, num_microbatches=4, layout=LayoutOptions(seed=5))
    chooser = AdaptiveChooser(
        lambda length: gpt_costs(num_layers=2, d_model=16, num_heads=2, seq_len=length, overhead_s=1e-4),
        AdaptiveSpace(**{**_SPACE.__dict__, "trial_steps": 1}),
    )
    runner = AdaptiveRunner(pipe, chooser)
    inputs = torch.randint(0, 256, (8, 32))
    for _ in range(3):
        choice = runner.prepare(inputs)
        pipe.step(inputs, inputs)
        runner.finish(choice)
    (row,) = chooser.report()
    assert row["steps"] == 3 and row["settled"] and len(row["measured_s"]) == 2


def test_more_microbatches_than_built_are_refused():
    pipe = Pipeline(_layers(), loss_fn=gpt_loss, schedule="1f1b", num_microbatches=2)
    with pytest.raises(ConfigError, match="4 micro-batches, more than the 2 this pipeline was built with"):
        pipe.use_schedule(build("1f1b", num_ranks=1, num_microbatches=4))


def test_inputs_without_a_length_are_refused():
    pipe = Pipeline(_layers(), loss_fn=gpt_loss, schedule="1f1b", num_microbatches=2)
    runner = AdaptiveRunner(pipe, _Scripted([("1f1b", 2, "none")]))
    with pytest.raises(ConfigError, match="rows x sequence length"):
        runner.prepare(torch.zeros(8))
