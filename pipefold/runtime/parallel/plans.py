"""Ready-made tensor-parallel plans (`ParallelOptions(tensor_parallel=...)`): the zoo's GPT, and
(from `hf_plan`) Hugging Face models (GPT-2, Llama, Mistral, Qwen2) cut by `pipefold.split`.

    >>> from pipefold.runtime import gpt_tensor_parallel_plan, hf_tensor_parallel_plan
    >>> plan = gpt_tensor_parallel_plan(sequence_parallel=True, vocab_parallel=True)
    >>> Pipeline(gpt_layers(...), ..., parallel=ParallelOptions(process_group=mesh, tensor_parallel=plan))
    >>> plan = hf_tensor_parallel_plan()
    >>> Pipeline(pipefold.split(llama), ..., parallel=ParallelOptions(process_group=mesh,
    ...                                                             tensor_parallel=plan))

A plan names, per layer, which submodules split how; it lives with the parallel styles it
uses (`tensor_parallel`, `sequence_parallel`), not with the model it describes, so the
model package needs nothing from the runtime.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from pipefold.model.zoo.gpt import DecoderBlock, LMHead, PositionEmbedding, TokenEmbedding
from pipefold.runtime.parallel.hf_plan import hf_tensor_parallel_plan
from pipefold.runtime.parallel.sequence_parallel import (
    ColwiseFromSequence,
    DropoutOnSequence,
    GatherSequence,
    ScatterSequence,
)
from pipefold.runtime.parallel.tensor_parallel import TensorParallelPlan
from pipefold.runtime.parallel.vocab_parallel import VocabParallel

__all__ = ["gpt_tensor_parallel_plan", "hf_tensor_parallel_plan"]


def gpt_tensor_parallel_plan(
    *, sequence_parallel: bool = False, vocab_parallel: bool = False
) -> TensorParallelPlan:
    """How `pipefold train --tensor-parallel` splits the GPT (`ParallelOptions(tensor_parallel=...)`):
    each decoder block's attention by heads (head_qkv by columns, proj by rows) and its MLP
    (fc by columns, fc_out by rows), Megatron's split: every weight of a block but its two
    LayerNorms, and two all-reduces per block forward (and two in its backward). The
    embeddings, the final LayerNorm and the head stay whole unless `vocab_parallel`. The
    degree must divide the number of heads.

    `sequence_parallel=True` adds Megatron's sequence parallelism (docs/decisions.md, "sequence
    parallel x pipeline"): from the position embedding to the final LayerNorm the residual
    stream is split along the sequence, the block's norms run on T/tp positions
    (`SequenceParallel`), the column-split projections all-gather the sequence and the
    row-split ones reduce-scatter it, and stage boundaries carry 1/tp of the stream. Sequence
    lengths must then divide by the degree.

    `vocab_parallel=True` splits the token embedding and the output head (tied or not) by
    vocabulary rows (`VocabParallel`, Megatron's VocabParallelEmbedding and parallel output
    layer): the logits leave the head split by vocabulary and `gpt_loss` runs the
    vocabulary-parallel cross-entropy. The vocabulary must divide by the degree."""
    blocks = {
        "attn.head_qkv": ColwiseParallel(),
        "attn.proj": RowwiseParallel(),
        "fc": ColwiseParallel(),
        "fc_out": RowwiseParallel(),
    }
    if not sequence_parallel and not vocab_parallel:
        return blocks

    def by_layer(_index: int, module: nn.Module) -> dict[str, Any] | None:
        # By type, not index: the plan holds for any num_layers and for both head kinds.
        if vocab_parallel and isinstance(module, (TokenEmbedding, LMHead)):
            return {"": VocabParallel()}
        if not sequence_parallel:
            return dict(blocks) if isinstance(module, DecoderBlock) else None
        if isinstance(module, PositionEmbedding):
            return {"": ScatterSequence(sequence_dim=1)}
        if isinstance(module, DecoderBlock):
            sequence = Shard(1)
            return {
                "ln1": SequenceParallel(),
                "attn.head_qkv": ColwiseFromSequence(sequence_dim=1),
                "attn.proj": RowwiseParallel(output_layouts=sequence),
                "ln2": SequenceParallel(),
                "fc": ColwiseFromSequence(sequence_dim=1),
                "fc_out": RowwiseParallel(output_layouts=sequence),
                # Seeded dropout on the slices: the one-process mask's slice (unfused attention).
                "dropout": DropoutOnSequence(sequence_dim=1),
                "mlp_dropout": DropoutOnSequence(sequence_dim=1),
            }
        if isinstance(module, nn.LayerNorm):  # the final norm: the last layer of the sharded stream
            return {"": GatherSequence(sequence_dim=1)}
        return None

    return by_layer
