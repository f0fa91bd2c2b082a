"""The training job's optimizer pieces in one process (pipefold/job/optim.py): the LR schedules
against torch's own schedulers, the weight-decay groups of the built-in GPT, gradient
accumulation equal to one larger batch, and the config's refusals of the new fields."""

from __future__ import annotations

import math

import pytest
import torch

from pipefold.errors import ConfigError
from pipefold.job.config import load_config
from pipefold.job.optim import accumulated_step, lr_factor, lr_scheduler, parameter_groups
from pipefold.model import build_reference
from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.runtime import LayoutOptions, Pipeline


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int):
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_equals_torch_schedulers(schedule):
    lr, min_lr, warmup, total = 3e-3, 3e-4, 5, 40
    optimizer = _optimizer(lr)
    ours = _lrs(
        lr_scheduler(optimizer, schedule=schedule, warmup_steps=warmup, total_steps=total, lr=lr,
                     min_lr=min_lr),
        optimizer, total,
    )
    # torch: LinearLR for the warm-up, then the decay from the peak, each on a fresh optimizer.
    warm = _optimizer(lr)
    expected = _lrs(
        torch.optim.lr_scheduler.LinearLR(warm, start_factor=1 / warmup, total_iters=warmup - 1), warm, warmup
    )
    decay = _optimizer(lr)
    if schedule == "cosine":
        torch_decay: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            decay, T_max=total - warmup, eta_min=min_lr
        )
    elif schedule == "linear":
        torch_decay = torch.optim.lr_scheduler.LinearLR(
            decay, start_factor=1.0, end_factor=min_lr / lr, total_iters=total - warmup
        )
    else:
        torch_decay = torch.optim.lr_scheduler.ConstantLR(decay, factor=1.0)
    expected += _lrs(torch_decay, decay, total - warmup)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    if schedule != "constant":  # the decay reaches min_lr at total_steps (one step after the last)
        assert lr_factor(schedule, warmup_steps=warmup, total_steps=total, min_ratio=0.1)(total) == (
            pytest.approx(0.1)
        )


def test_no_warmup_starts_at_the_peak():
    factor = lr_factor("cosine", warmup_steps=0, total_steps=10, min_ratio=0.0)
    assert factor(0) == 1.0 and factor(5) == pytest.approx(0.5)
    assert math.isclose(factor(10), 0.0, abs_tol=1e-12)


def test_weight_decay_groups_of_the_gpt():
    layers = gpt_layers(256, 16, 2, 2, 8)
    model = build_reference(layers)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model.modules(), model.parameters(), weight_decay=0.1)
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    exempt = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert len(decayed) + len(exempt) == len(names)
    # Matrices of the blocks decay; the token table (tied head), positions, norms and biases do not.
    assert all(".weight" in name and "ln" not in name for name in decayed)
    assert "0.weight" in exempt and "1.position" in exempt
    assert any(name.endswith("bias") for name in exempt) and any(".ln1." in name for name in exempt)
    assert all(p.dim() == 2 for p in groups[0]["params"])


def test_accumulating_k_steps_equals_one_step_of_k_times_the_batch():
    layers = gpt_layers(256, 16, 2, 2, 8)
    pipe = Pipeline(
        layers, loss_fn=gpt_loss, schedule="gpipe", num_microbatches=2, layout=LayoutOptions(seed=3)
    )
    reference = build_reference(gpt_layers(256, 16, 2, 2, 8), seed=3)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (12, 9), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batches = [(inputs[i : i + 4], targets[i : i + 4]) for i in (0, 4, 8)]
    loss = accumulated_step(pipe, batches)
    expected = gpt_loss(reference(inputs), targets)
    expected.backward()
    torch.testing.assert_close(loss, expected.item())
    params = dict(reference.named_parameters())
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"optimizer.lr_schedule": "step"}, "optimizer.lr_schedule='step'"),
        ({"optimizer.min_lr": -1}, "optimizer.min_lr=-1"),
        ({"optimizer.min_lr": 1.0}, "optimizer.min_lr=1.0"),  # above lr
        ({"optimizer.clip_grad_norm": -1.0}, "optimizer.clip_grad_norm=-1.0"),
        ({"optimizer.clip_grad_norm": float("inf")}, "optimizer.clip_grad_norm=inf"),
        ({"grad_accumulation": 0}, "grad_accumulation=0"),
        (
            {"optimizer.clip_grad_norm": 1.0, "schedule.name": "pipedream", "model.tie_embeddings": False},
            "optimizer.clip_grad_norm=1.0",
        ),
        (
            {"grad_accumulation": 2, "schedule.name": "pipedream", "model.tie_embeddings": False},
            "grad_accumulation=2",
        ),
    ],
)
def test_bad_training_fields_are_refused_by_name(overrides, names):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert names in str(info.value)


def test_training_fields_accepted():
    config = load_config(overrides={"optimizer.lr_schedule": "cosine", "optimizer.min_lr": 1e-4,
                                    "optimizer.clip_grad_norm": 1, "grad_accumulation": 4})
    assert config.optimizer.clip_grad_norm == 1.0 and config.grad_accumulation == 4
