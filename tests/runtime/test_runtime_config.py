"""Bad configuration is refused in the constructor, before any communication (one process, no group)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipefold.errors import ConfigError, PartitionError, ScheduleError
from pipefold.model import LayerSpec, TiedLayerSpec
from pipefold.runtime import Pipeline


def layers(count=4):
    return [LayerSpec(nn.Linear, 4, 4) for _ in range(count)]


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"schedule": "no-such"}, ScheduleError, "unknown schedule 'no-such'"),
        ({"num_microbatches": 0}, ConfigError, "num_microbatches=0"),
        ({"recompute": "some"}, ConfigError, "recompute='some'"),
        ({"recompute": [7]}, ConfigError, "recompute=[7]"),
        ({"optimizer": sgd}, ConfigError, "flush schedule"),
        ({"schedule": "pipedream"}, ConfigError, "optimizer="),
        ({"schedule": "pipedream", "optimizer": sgd, "recompute": "full"}, ConfigError, "recompute='full'"),
        (
            {"schedule": "pipedream", "optimizer": sgd, "on_nonfinite": "skip"},
            ConfigError,
            "on_nonfinite='skip'",
        ),
        (
            {"schedule": "interleaved-1f1b", "num_virtual": 5},
            PartitionError,
            "cannot cut 4 layers into 5 stages",
        ),
        ({"on_nonfinite": "ignore"}, ConfigError, "on_nonfinite = 'ignore'"),
        ({"timeout_s": 0}, ConfigError, "timeout_s = 0"),
        ({"busy_wait": "yes"}, ConfigError, "busy_wait = 'yes'"),
        ({"partition": [3, 3]}, PartitionError, ""),
    ],
)
def test_bad_configuration_is_refused(kwargs, error, words):
    with pytest.raises(error, match=None) as caught:
        Pipeline(layers(), loss_fn=F.mse_loss, **{"schedule": "gpipe", **kwargs})
    assert words in str(caught.value)


def test_async_schedule_refuses_tied_layers():
    tied = [
        TiedLayerSpec("t", nn.Linear, 4, 4),
        LayerSpec(nn.Linear, 4, 4),
        TiedLayerSpec("t", nn.Linear, 4, 4),
    ]
    with pytest.raises(ConfigError, match="tied layers"):
        Pipeline(tied, loss_fn=F.mse_loss, schedule="pipedream", optimizer=sgd)


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


def test_count_memory_every_must_be_positive():
    import pytest
    import torch.nn.functional as F
    from torch import nn

    from pipefold import ConfigError, Pipeline

    with pytest.raises(ConfigError, match="count_memory_every = 0"):
        Pipeline(
            [nn.Linear(2, 2)], loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=1, count_memory_every=0
        )


def test_busy_wait_defaults_to_polling_where_each_rank_has_a_core():
    """One process has a core of its own; busy_wait=False and True override the choice."""
    from pipefold.runtime.failure import BUSY_POLL_S

    def busy_poll_s(**kwargs):
        pipe = Pipeline(layers(), loss_fn=F.mse_loss, schedule="gpipe", device="cpu", **kwargs)
        return pipe.watchdog._busy_poll_s

    assert busy_poll_s() == BUSY_POLL_S > 0
    assert busy_poll_s(busy_wait=False) == 0.0
    assert busy_poll_s(busy_wait=True) == BUSY_POLL_S
