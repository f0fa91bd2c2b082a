"""The rulebook (`pipefold.parallel_config`): every refusal once, in one process, as each caller words it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipefold.errors import ConfigError
from pipefold.parallel_config import ParallelConfig

ASYNC = {"schedule": "pipedream", "weight_update": "stash"}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"pp": 0}, "pp=0 is not allowed: use an integer >= 1"),
        ({"dp": 0}, "dp=0 is not allowed"),
        ({"tp": True}, "tp=True is not allowed"),
        ({"num_microbatches": 0}, "num_microbatches=0 is not allowed"),
        ({"compile": True, "tp": 2}, "compile=True is not allowed: torch.compile of tensor-parallel"),
        ({"num_virtual": 0}, "num_virtual=0 is not allowed: give at least 1 stage per rank"),
        ({"recompute": "some"}, 'recompute=\'some\' is not allowed: use "none", "full"'),
        (
            {"recompute": (1, 9), "num_layers": 8},
            "recompute=[1, 9] is not allowed: layer indices must lie in 0..7",
        ),
        ({"recompute": (-1,)}, "recompute=[-1] is not allowed"),
        (
            {**ASYNC, "tp": 2},
            "tp=2 is not allowed: schedule='pipedream' updates weights inside the step (stash) "
            "from stashed copies",
        ),
        (
            {**ASYNC, "dp": 2, "zero": True},
            "zero=True is not allowed: schedule='pipedream' steps each stage's own optimizer",
        ),
        (
            {**ASYNC, "on_nonfinite": "skip"},
            "on_nonfinite='skip' is not allowed: schedule='pipedream' updates",
        ),
        (
            {"zero": True},
            "zero=True is not allowed: it shards the optimizer state over data-parallel replicas "
            "and there are none (dp=1)",
        ),
        ({"zero": True, "dp": 2, "tp": 2}, "zero=True is not allowed: ZeRO shards whole parameters"),
        ({"sequence_parallel": True}, "sequence_parallel=True is not allowed: it splits the sequence"),
        (
            {"sequence_parallel": True, "tp": 2, "seq_len": 127},
            "seq_len=127 is not allowed: sequence parallelism "
            "splits every sequence over tp=2 ranks; use a length divisible by 2 (e.g. 126)",
        ),
        (
            {"tp": 3, "num_heads": 4},
            "tp=3 is not allowed: attention is split by heads, so it must divide num_heads=4",
        ),
        ({"shard": "half"}, "shard='half' is not allowed: use one of replicate, zero1, full"),
        ({"shard": "zero1"}, "shard='zero1' is not allowed: it shards the optimizer state"),
        (
            {"shard": "full"},
            "shard='full' is not allowed: full sharding splits each stage over the data-parallel "
            "replicas and there are none (dp=1); set dp > 1 or shard='replicate'",
        ),
        (
            {**ASYNC, "shard": "full", "dp": 2},
            "shard='full' is not allowed: schedule='pipedream' updates weights inside the step",
        ),
        (
            {"schedule": "pipedream", "weight_update": "stash", "shard": "full"},
            "shard='full' is not allowed: full sharding splits each stage",
        ),
        ({"shard": "full", "dp": 2, "zero": True}, "full sharding already shards the optimizer state"),
    ],
)
def test_every_refusal_names_field_value_and_fix(fields, words):
    with pytest.raises(ConfigError) as caught:
        ParallelConfig(**fields).check()
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"pp": 4, "dp": 2, "tp": 2, "num_heads": 4, "sequence_parallel": True, "seq_len": 128, "zero": False},
        {"dp": 2, "zero": True, "weight_update": "flush", "tied_layers": True, "recompute": (0, 3)},
        # Asynchronous rules apply only once the schedule is known.
        {"schedule": "pipedream", "dp": 2, "tied_layers": True},
        {**ASYNC, "recompute": "none", "on_nonfinite": "raise"},
        {"dp": 2, "shard": "full", "weight_update": "flush", "recompute": "full", "precision": "bf16"},
        {"dp": 2, "shard": "full", "precision": "fp16", "tied_layers": True, "shared_parameters": True},
        {"dp": 2, "shard": "zero1"},
        # bf16 weights with replicas (gradients all-reduced in fp32) and tensor parallelism.
        {"pp": 2, "dp": 2, "tp": 2, "precision": "bf16-pure", "weight_update": "flush", "tied_layers": True},
        # ... and with ZeRO-1: each replica keeps the fp32 masters of its own parameters.
        {"dp": 2, "zero": True, "precision": "bf16-pure", "weight_update": "flush", "tied_layers": True},
        {"dp": 2, "shard": "zero1", "precision": "bf16-pure", "weight_update": "flush"},
        # ... and with full sharding: bf16 shards reduce-scattered in fp32, masters per shard.
        {"dp": 2, "shard": "full", "precision": "bf16-pure", "weight_update": "flush", "tied_layers": True},
        # ... and asynchronous: each stage's optimizer keeps the masters, per-update sums in fp32.
        {"precision": "bf16-pure", "schedule": "pipedream", "weight_update": "stash", "dp": 2,
         "tied_layers": True},
        {"precision": "bf16-pure", "schedule": "pipedream-2bw", "weight_update": "double_buffer", "dp": 2},
    ],
)
def test_legal_configurations_pass(fields):
    ParallelConfig(**fields).check()


def test_names_word_a_refusal_as_the_caller_spells_its_fields():
    with pytest.raises(ConfigError) as caught:
        ParallelConfig(zero=True).check({"zero": "optimizer.zero", "dp": "schedule.data_parallel"})
    assert str(caught.value).startswith("optimizer.zero=True is not allowed")
    assert "set schedule.data_parallel > 1 or optimizer.zero=False" in str(caught.value)
    with pytest.raises(ValueError, match="unknown ParallelConfig fields"):
        ParallelConfig().check({"nope": "x"})


def test_the_rulebook_imports_no_torch():
    code = "import sys, pipefold.parallel_config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the callers: pipefold train's configuration, Pipeline, sharded_optimizer ---------------------


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (
            {"schedule.data_parallel": 2, "schedule.name": "pipedream", "optimizer.zero": True},
            "optimizer.zero=True is not allowed: schedule.name='pipedream' steps each stage's own optimizer",
        ),
        ({"optimizer.zero": True}, "set schedule.data_parallel > 1 or optimizer.zero=False"),
    ],
)
def test_the_train_config_asks_the_rulebook(overrides, words):
    from pipefold.job.config import load_config

    with pytest.raises(ConfigError) as caught:
        load_config(overrides=overrides)
    assert words in str(caught.value)


def test_pipeline_asks_the_rulebook_and_keeps_its_answer():
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pipefold.model import LayerSpec
    from pipefold.runtime import LayoutOptions, ParallelOptions, Pipeline, RuntimeOptions, sharded_optimizer

    layers = [LayerSpec(nn.Linear, 4, 4) for _ in range(3)]
    pipe = Pipeline(
        layers, loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=2, layout=LayoutOptions(recompute=[1])
    )
    assert pipe.parallel_config == ParallelConfig(
        pp=1,
        num_microbatches=2,
        num_virtual=1,
        schedule="gpipe",
        weight_update="flush",
        recompute=(1,),
        num_layers=3,
    )
    # sharded_optimizer: one process has no replicas to shard over.
    with pytest.raises(
        ConfigError, match=r"sharded_optimizer=True is not allowed: .* there are none \(dp=1\)"
    ):
        sharded_optimizer(pipe, torch.optim.AdamW, lr=1e-3)
    # Full sharding without replicas, and a shard mode Pipeline does not take, are refused up front.
    with pytest.raises(ConfigError, match=r"shard='full' is not allowed: .* there are none \(dp=1\)"):
        Pipeline(layers, loss_fn=F.mse_loss, parallel=ParallelOptions(shard="full"))
    with pytest.raises(ConfigError, match="ParallelOptions.shard = 'zero1'; .*runtime.sharded_optimizer"):
        ParallelOptions(shard="zero1")  # type: ignore[arg-type]
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    with pytest.raises(ConfigError, match="on_nonfinite='skip' is not allowed: schedule='pipedream'"):
        Pipeline(
            layers, loss_fn=F.mse_loss, schedule="pipedream", parallel=ParallelOptions(optimizer=sgd),
            runtime=RuntimeOptions(on_nonfinite="skip"),
        )


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({**ASYNC, "adaptive": True}, "adaptive=True is not allowed: schedule='pipedream' updates weights"),
        ({"adaptive": True, "dp": 2, "zero": True},
         "zero=True is not allowed: the adaptive choice (adaptive)"),
        ({"adaptive": True, "dp": 2, "shard": "full"}, "shard='full' is not allowed: the adaptive choice"),
        ({"adaptive": True, "tp": 2, "vocab_parallel": True},
         "vocab_parallel=True is not allowed: the adaptive"),
        ({"adaptive": True, "recompute": "full"}, "it chooses the recomputation per batch itself"),
    ],
)
def test_adaptive_refusals(fields, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ParallelConfig(**fields).check()


def test_adaptive_alone_passes():
    ParallelConfig(pp=2, adaptive=True, schedule="zb-h1", weight_update="flush").check()


def test_adaptive_with_replicas_and_tensor_parallel_ranks_passes():
    """They agree on the measured step (pipefold.runtime.adaptive.agreed_step_s)."""
    ParallelConfig(pp=2, dp=2, tp=2, adaptive=True, schedule="1f1b", weight_update="flush").check()
