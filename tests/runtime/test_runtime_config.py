"""Bad configuration is refused in the constructor, before any communication (one process, no group)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipefold.errors import ConfigError, PartitionError, PipelineError, ScheduleError
from pipefold.model import LayerSpec
from pipefold.runtime import LayoutOptions, ParallelOptions, Pipeline, RuntimeOptions, TransportOptions


def layers(count=4):
    return [LayerSpec(nn.Linear, 4, 4) for _ in range(count)]


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"schedule": "no-such"}, ScheduleError, "unknown schedule 'no-such'"),
        ({"num_microbatches": 0}, ConfigError, "num_microbatches=0"),
        ({"layout": LayoutOptions(recompute="some")}, ConfigError, "recompute='some'"),
        ({"layout": LayoutOptions(recompute=[7])}, ConfigError, "recompute=[7]"),
        ({"parallel": ParallelOptions(optimizer=sgd)}, ConfigError, "flush schedule"),
        ({"schedule": "pipedream"}, ConfigError, "ParallelOptions(optimizer="),
        (
            {
                "schedule": "pipedream",
                "parallel": ParallelOptions(optimizer=sgd),
                "runtime": RuntimeOptions(on_nonfinite="skip"),
            },
            ConfigError,
            "on_nonfinite='skip'",
        ),
        (
            {"schedule": "interleaved-1f1b", "num_virtual": 5},
            PartitionError,
            "cannot cut 4 layers into 5 stages",
        ),
        ({"layout": LayoutOptions(partition=[3, 3])}, PartitionError, ""),
        ({"runtime": {"timeout_s": 1}}, ConfigError, "Pipeline(runtime={'timeout_s': 1}): give a"),
    ],
)
def test_bad_configuration_is_refused(kwargs, error, words):
    with pytest.raises(error, match=None) as caught:
        Pipeline(layers(), loss_fn=F.mse_loss, **{"schedule": "gpipe", **kwargs})
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("group", "fields", "words"),
    [
        (RuntimeOptions, {"on_nonfinite": "ignore"}, "RuntimeOptions.on_nonfinite = 'ignore'"),
        (RuntimeOptions, {"timeout_s": 0}, "RuntimeOptions.timeout_s = 0"),
        (RuntimeOptions, {"busy_wait": "yes"}, "RuntimeOptions.busy_wait = 'yes'"),
        (RuntimeOptions, {"count_memory_every": 0}, "RuntimeOptions.count_memory_every = 0"),
        (TransportOptions, {"shared_memory_bytes": -1}, "TransportOptions.shared_memory_bytes = -1"),
        (LayoutOptions, {"seed": "7"}, "LayoutOptions.seed = '7'"),
        (ParallelOptions, {"optimizer": "sgd"}, "ParallelOptions.optimizer = 'sgd'"),
    ],
)
def test_bad_options_are_refused_by_their_group(group, fields, words):
    with pytest.raises(ConfigError) as caught:
        group(**fields)
    assert words in str(caught.value)


def test_tied_owners_that_update_unequally_often_are_refused():
    """An asynchronous schedule sums a tied module's gradient over its owners at every STEP
    (runtime/update_reduction.py), so its owners must step equally often."""
    from pipefold.runtime.tied import TiedGradients
    from pipefold.runtime.update_reduction import UpdateReduction
    from pipefold.schedule import Action, Op, Schedule, WeightUpdate

    def row(stage, steps):
        return (Action(Op.F, stage, 0), Action(Op.B, stage, 0)) + tuple(
            Action(Op.STEP, stage, i) for i in range(steps)
        )

    schedule = Schedule(
        name="uneven", num_ranks=2, num_stages=2, num_microbatches=1, placement=(0, 1),
        actions=(row(0, 1), row(1, 2)), weight_update=WeightUpdate.STASH,
    )
    param = nn.Parameter(torch.zeros(2))
    tied = TiedGradients([((0, 1), (param,))], 0, None, None)
    refused = r"the ranks \[0, 1\] that hold a tied module .* step \{0: 1, 1: 2\}"
    group = object()  # stands for the owners' process group (owner_groups makes it in a world)
    with pytest.raises(ConfigError, match=refused):
        UpdateReduction.of({0: [param]}, tied, schedule, 0, None, None, groups={(0, 1): group})
    even = Schedule(
        name="even", num_ranks=2, num_stages=2, num_microbatches=1, placement=(0, 1),
        actions=(row(0, 1), row(1, 1)), weight_update=WeightUpdate.STASH,
    )
    assert UpdateReduction.of({0: [param]}, tied, even, 0, None, None, groups={(0, 1): group}).needed
    with pytest.raises(PipelineError, match=r"tied with ranks \[0, 1\] but has no process group"):
        UpdateReduction.of({0: [param]}, tied, even, 0, None, None, groups={})


def test_owner_groups_are_made_only_for_modules_tied_across_ranks(monkeypatch):
    """The owners' process groups of an asynchronous schedule's tied sums (its own communicator,
    runtime/update_reduction.py): a model that ties nothing across ranks, or a pipeline in one
    process, makes none and talks to nobody; a tied module makes one group per owner set, in
    sorted order, and this rank keeps the ones it belongs to."""
    import torch.distributed as dist

    from pipefold.runtime.parallel.dims import ParallelDims
    from pipefold.runtime.tied import TiedGradients
    from pipefold.runtime.update_reduction import owner_groups

    made: list[list[int]] = []
    monkeypatch.setattr(dist, "new_group", lambda ranks: made.append(ranks) or tuple(ranks))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 5)
    # Pipeline ranks 0..3 are world ranks 2..5 (a world of two pipelines would gather theirs).
    dims = ParallelDims.__new__(ParallelDims)
    dims.pipeline_group, dims.ranks = object(), (2, 3, 4, 5)  # type: ignore[assignment]
    assert owner_groups(TiedGradients([], 3, None, None), dims) == {}
    tied = TiedGradients([], 3, None, None, all_owners=[(0, 3), (1, 2), (0, 3)])
    assert owner_groups(tied, dims) == {(0, 3): (2, 5)}
    assert made == [[2, 5], [3, 4]]
    dims.pipeline_group = None
    assert owner_groups(tied, dims) == {}


def test_step_refuses_batches_smaller_than_num_microbatches():
    pipe = Pipeline(layers(), loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=4)
    with pytest.raises(ConfigError, match="the batch has 3 rows but num_microbatches is 4"):
        pipe.step(torch.randn(3, 4), torch.randn(3, 4))


def test_named_parameters_and_state_dict_use_sequential_names():
    pipe = Pipeline(layers(3), loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=2)
    reference = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    assert [n for n, _ in pipe.named_parameters()] == [n for n, _ in reference.named_parameters()]
    pipe.load_state_dict(reference.state_dict())
    for name, value in pipe.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name])
    with pytest.raises(ConfigError, match="lacks"):
        pipe.load_state_dict({})


def test_a_ready_schedule_must_match_the_other_arguments():
    from pipefold.schedule import build

    schedule = build("interleaved-1f1b", num_ranks=1, num_microbatches=2, num_virtual=2)
    with pytest.raises(ConfigError, match="num_microbatches=3 but schedule"):
        Pipeline(layers(), loss_fn=F.mse_loss, schedule=schedule, num_microbatches=3)
    with pytest.raises(ConfigError, match="num_virtual=4 but schedule"):
        Pipeline(layers(), loss_fn=F.mse_loss, schedule=schedule, num_virtual=4)
    pipe = Pipeline(layers(), loss_fn=F.mse_loss, schedule=schedule, num_microbatches=2, num_virtual=2)
    assert len(pipe.stages) == 2 and str(pipe.partition) == "[0:2 | 2:4]"


def test_busy_wait_defaults_to_polling_where_each_rank_has_a_core():
    """One process has a core of its own; busy_wait=False and True override the choice."""
    from pipefold.runtime.failure import BUSY_POLL_S

    def busy_poll_s(**kwargs):
        pipe = Pipeline(
            layers(), loss_fn=F.mse_loss, schedule="gpipe", layout=LayoutOptions(device="cpu"),
            runtime=RuntimeOptions(**kwargs),
        )
        return pipe.watchdog._busy_poll_s

    assert busy_poll_s() == BUSY_POLL_S > 0
    assert busy_poll_s(busy_wait=False) == 0.0
    assert busy_poll_s(busy_wait=True) == BUSY_POLL_S


def test_a_split_module_keeps_its_names_and_loads_its_own_state_dict():
    """One process: the pipeline's names are the module's, its state dict is the module's without
    the duplicate of the tied head, and the module's own state dict loads back."""
    import sys
    from pathlib import Path

    sys.path.append(str(Path(__file__).resolve().parents[1]))
    from model.split_models import SEQ, NaturalTransformer

    import pipefold

    torch.manual_seed(0)
    model = NaturalTransformer()
    other = NaturalTransformer()
    layers = pipefold.split(model, example_inputs=(torch.zeros(2, SEQ, dtype=torch.long),))
    pipe = Pipeline(layers, loss_fn=lambda out, y: out.sum(), schedule="gpipe", num_microbatches=1)
    assert [n for n, _ in pipe.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(pipe.state_dict()) == [k for k in model.state_dict() if k != "head.weight"]
    pipe.load_state_dict(other.state_dict())
    for name, value in other.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value)


_OTHER = nn.Linear(2, 2)


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        (lambda params: torch.optim.LBFGS(params), "returned LBFGS, which re-evaluates the loss"),
        (lambda params: torch.optim.SGD(_OTHER.parameters(), lr=0.1), "over 2 other tensor(s), not over"),
        (lambda params: "adam", "returned str, not a torch.optim.Optimizer"),
        (lambda: None, "raised TypeError"),
    ],
    ids=["closure", "other-params", "not-an-optimizer", "bad-signature"],
)
def test_an_optimizer_the_stash_cannot_step_is_refused(factory, words):
    with pytest.raises(ConfigError) as caught:
        Pipeline(
            layers(), loss_fn=F.mse_loss, schedule="pipedream-2bw",
            parallel=ParallelOptions(optimizer=factory),
        )
    assert words in str(caught.value) and "ParallelOptions.optimizer" in str(caught.value)


def _batches(count, rows=4):
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(rows, 4, generator=generator), torch.randn(rows, 4, generator=generator))
        for _ in range(count)
    ]


def test_train_refuses_a_flush_schedule_and_bad_runs():
    flush = Pipeline(layers(), loss_fn=F.mse_loss, schedule="1f1b", num_microbatches=2)
    with pytest.raises(ConfigError, match=r"schedule '1f1b' is a flush schedule.*schedule='pipedream'"):
        flush.train(_batches(2), steps=2)
    pipe = Pipeline(layers(), loss_fn=F.mse_loss, schedule="pipedream", num_microbatches=2,
                    parallel=ParallelOptions(optimizer=sgd))
    with pytest.raises(ConfigError, match=r"train\(steps=0\)"):
        pipe.train(_batches(2), steps=0)
    with pytest.raises(ConfigError, match=r"batches ran out after 2 of 3 steps"):
        pipe.train(_batches(2), steps=3)
    again = Pipeline(layers(), loss_fn=F.mse_loss, schedule="pipedream", num_microbatches=2,
                     parallel=ParallelOptions(optimizer=sgd))
    uneven = _batches(1) + _batches(1, rows=6)
    with pytest.raises(ConfigError, match=r"step 1's inputs are .* needs every batch of one shape"):
        again.train(uneven, steps=2)


def test_train_in_one_process_equals_a_plain_model_for_one_microbatch():
    """p = 1, m = 1: nothing is in flight across an update, so streaming PipeDream is plain SGD."""
    pipe = Pipeline(layers(), loss_fn=F.mse_loss, schedule="pipedream", num_microbatches=1,
                    layout=LayoutOptions(seed=5), parallel=ParallelOptions(optimizer=sgd))
    plain = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    plain.load_state_dict(pipe.state_dict())
    optimizer = sgd(plain.parameters())
    data = _batches(3)
    losses = pipe.train(iter(data), steps=3)
    for (x, y), loss in zip(data, losses, strict=True):
        expected = F.mse_loss(plain(x), y)
        expected.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert loss == pytest.approx(expected.item(), rel=1e-6)
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.detach(), dict(plain.named_parameters())[name].detach())
