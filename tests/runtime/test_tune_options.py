"""tune_schedule's options are checked before any step runs; the trial's early stop rule."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipefold.errors import ConfigError
from pipefold.runtime import ParallelOptions, RuntimeOptions, tune_schedule
from pipefold.runtime.tune import _separated


def _tune(**options):
    layers = [nn.Linear(4, 4) for _ in range(2)]
    return tune_schedule(
        layers, loss_fn=F.mse_loss, inputs=torch.randn(4, 4), targets=torch.randn(4, 4), num_microbatches=2,
        **options,
    )


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"num_trial_steps": -1}, "num_trial_steps"),
        ({"num_trial_steps": True}, "num_trial_steps"),
        ({"num_trial_families": 0}, "num_trial_families"),
        ({"num_trial_families": 1.5}, "num_trial_families"),
        ({"num_probe_steps": 0}, "num_probe_steps"),
        ({"placement": "ring"}, "placement"),
        ({"runtime": RuntimeOptions(record_timeline=False)}, "record_timeline"),
        ({"parallel": ParallelOptions(optimizer=lambda params: torch.optim.SGD(params))}, "optimizer"),
    ],
)
def test_bad_options_are_refused_naming_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        _tune(**options)


def test_the_trial_stops_only_on_a_clear_leader():
    # Every step of the first beat every step of the others.
    assert _separated([[1.0, 1.1], [1.2, 1.3], [1.15, 1.4]])
    # The leader by median once ran slower than another candidate's fastest step.
    assert not _separated([[1.0, 1.25], [1.2, 1.3]])
    # A tie is not a clear leader.
    assert not _separated([[1.0, 1.0], [1.0, 1.0]])
