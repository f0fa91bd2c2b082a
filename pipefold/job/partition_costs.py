"""The default partition of `pipefold train` ("flops"): stages balanced by each layer's estimated
FLOPs, not by layer counts, torch-free so the job's configuration knows the cut before any process
starts.

    from pipefold.job.partition_costs import job_bounds
    job_bounds("flops", num_stages=4, model=config.model)   # (0, 3, 4, 5, 8) for the default GPT

The estimate is the planner's (`pipefold.plan.gpt_costs` for the built-in GPT, `hf_costs` for a
Hugging Face model), forward + backward per layer. An even layer count leaves the embeddings (a
gather) alone on the first rank and the final norm and head on the last; the estimate gives them
nearly nothing, so they join a block's stage. On this machine the estimate ranks the default GPT's
layers as measured, closer than parameter counts (which weigh the embedding tables like a block's
share): see BENCHMARKS.md, "Default partition by estimated cost".
"""

from __future__ import annotations

from pipefold.balance import balance
from pipefold.job.sections import ModelConfig
from pipefold.plan import gpt_costs
from pipefold.plan.hf_estimate import hf_costs

__all__ = ["estimated_layer_costs", "flops_counts", "job_bounds"]


def estimated_layer_costs(model: ModelConfig) -> list[float]:
    """Forward + backward seconds per pipeline layer of `model` at an assumed rate: only their
    ratios matter. Tensor parallelism is not priced (it divides the blocks and, without
    vocabulary parallelism, not the embedding and head; the cut stays that of tp = 1)."""
    if model.hf is not None:
        costs = hf_costs(model.hf.config, seq_len=model.seq_len)
    else:
        costs = gpt_costs(
            num_layers=model.num_layers, d_model=model.d_model, num_heads=model.num_heads,
            seq_len=model.seq_len, vocab_size=model.vocab_size, tie_embeddings=model.tie_embeddings,
        )
    return [layer.forward_s + layer.backward_s for layer in costs.layers]


def job_bounds(
    partition: str | tuple[int, ...], num_stages: int, model: ModelConfig
) -> tuple[int, ...] | None:
    """The stage bounds of the job's `partition` setting where the configuration alone tells them
    ("flops", "uniform" or per-stage counts); None where the layers are needed (parameters, types,
    profile). Stage s runs on any rank: the ranks are taken as equally fast."""
    if isinstance(partition, tuple):
        bounds = [0]
        for count in partition:
            bounds.append(bounds[-1] + count)
        return tuple(bounds)
    if partition == "uniform":
        return tuple(balance([1.0] * model.num_model_layers, num_stages).bounds)
    if partition == "flops":
        return tuple(balance(estimated_layer_costs(model), num_stages).bounds)
    return None


def flops_counts(num_stages: int, model: ModelConfig) -> list[int]:
    """Per-stage layer counts of the "flops" partition: `num_stages` stages of `model`, the slowest
    as fast as it can be under the estimate (`pipefold.balance.balance`)."""
    return list(balance(estimated_layer_costs(model), num_stages).counts)
