"""Ready-made tensor-parallel plans (`ParallelOptions(tensor_parallel=...)`): the zoo's GPT, and
Hugging Face Llama-family models cut by `pipefold.split`.

    >>> from pipefold.runtime import gpt_tensor_parallel_plan, hf_tensor_parallel_plan
    >>> plan = gpt_tensor_parallel_plan(sequence_parallel=True)
    >>> Pipeline(gpt_layers(...), ..., parallel=ParallelOptions(process_group=mesh, tensor_parallel=plan))
    >>> plan = hf_tensor_parallel_plan()
    >>> Pipeline(pipefold.split(llama), ..., parallel=ParallelOptions(process_group=mesh,
    ...                                                             tensor_parallel=plan))

A plan names, per layer, which submodules split how; it lives with the parallel styles it
uses (`tensor_parallel`, `sequence_parallel`), not with the model it describes, so the
model package needs nothing from the runtime.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
)

from pipefold.errors import ConfigError
from pipefold.model.split_graph import GraphPiece
from pipefold.model.zoo.gpt import DecoderBlock, PositionEmbedding
from pipefold.runtime.parallel.sequence_parallel import ColwiseFromSequence, GatherSequence, ScatterSequence
from pipefold.runtime.parallel.tensor_parallel import TensorParallelPlan

__all__ = ["LocalHeads", "gpt_tensor_parallel_plan", "hf_tensor_parallel_plan"]


def gpt_tensor_parallel_plan(*, sequence_parallel: bool = False) -> TensorParallelPlan:
    """How `pipefold train --tensor-parallel` splits the GPT (`ParallelOptions(tensor_parallel=...)`):
    each decoder block's attention by heads (head_qkv by columns, proj by rows) and its MLP
    (fc by columns, fc_out by rows), Megatron's split: every weight of a block but its two
    LayerNorms, and two all-reduces per block forward (and two in its backward). The
    embeddings, the final LayerNorm and the head stay whole. The degree must divide the
    number of heads.

    `sequence_parallel=True` adds Megatron's sequence parallelism (docs/decisions.md, "sequence
    parallel x pipeline"): from the position embedding to the final LayerNorm the residual
    stream is split along the sequence, the block's norms run on T/tp positions
    (`SequenceParallel`), the column-split projections all-gather the sequence and the
    row-split ones reduce-scatter it, and stage boundaries carry 1/tp of the stream. Sequence
    lengths must then divide by the degree."""
    if not sequence_parallel:
        return {
            "attn.head_qkv": ColwiseParallel(),
            "attn.proj": RowwiseParallel(),
            "fc": ColwiseParallel(),
            "fc_out": RowwiseParallel(),
        }

    def by_layer(_index: int, module: nn.Module) -> dict[str, Any] | None:
        # By type, not index: the plan holds for any num_layers and for both head kinds.
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
            }
        if isinstance(module, nn.LayerNorm):  # the final norm: the last layer of the sharded stream
            return {"": GatherSequence(sequence_dim=1)}
        return None

    return by_layer


class LocalHeads(ParallelStyle):
    """The attention module of a Hugging Face Llama-family block (`q_proj`, `k_proj`, `v_proj`,
    `o_proj`), for `hf_tensor_parallel_plan`: checks that the degree divides its query heads and
    its key/value heads (a column split of the projections must hand each rank whole heads, and
    the same query-head groups of grouped-query attention), and rewrites any head count the
    module holds to this rank's. The installed transformers reshapes with `-1` heads (from the
    projections' local outputs), and the query heads per key/value head are the same on every
    rank, so there is nothing to rewrite there; older versions read `self.num_heads` /
    `self.num_key_value_heads` in their reshapes."""

    _COUNTS = ("num_heads", "num_attention_heads", "num_key_value_heads")

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        degree = int(device_mesh.size())
        head_dim = _head_dim(module)
        query_heads = _out_features(module, "q_proj") // head_dim
        kv_heads = _out_features(module, "k_proj") // head_dim
        for what, count in (("attention heads", query_heads), ("key/value heads", kv_heads)):
            if count % degree:
                raise ConfigError(
                    f"tensor_parallel={degree}: {_path_of(module)} has {count} {what}, which {degree} "
                    f"tensor-parallel ranks cannot share (each rank takes whole heads); use a degree "
                    f"dividing {query_heads} and {kv_heads} (e.g. {math.gcd(query_heads, kv_heads)})"
                )
        for name in self._COUNTS:
            value = module.__dict__.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(module, name, value // degree)
        return module


def _out_features(module: nn.Module, name: str) -> int:
    linear = getattr(module, name)
    return int(linear.out_features if isinstance(linear, nn.Linear) else linear.weight.shape[0])


def _head_dim(module: nn.Module) -> int:
    head_dim = module.__dict__.get("head_dim")
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, int) and heads > 0:
        return _out_features(module, "q_proj") // heads
    raise ConfigError(
        f"tensor_parallel: {type(module).__name__} has neither head_dim nor config.num_attention_heads; "
        "hf_tensor_parallel_plan splits Hugging Face Llama-family attention"
    )


def _path_of(module: nn.Module) -> str:
    layer = getattr(module, "layer_idx", None)
    return f"{type(module).__name__} of block {layer}" if isinstance(layer, int) else type(module).__name__


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED_MLP = ("gate_proj", "up_proj", "down_proj")


def hf_tensor_parallel_plan() -> TensorParallelPlan:
    """How `pipefold train --model <dir> --tensor-parallel` splits a Hugging Face Llama-family
    model (llama, mistral, qwen2) cut by `pipefold.split` (`ParallelOptions(tensor_parallel=...)`):
    Megatron's split of each block, found by its submodules' names, whatever the block's path:
    the attention's `q_proj`, `k_proj`, `v_proj` by columns (whole heads, and whole key/value
    heads of grouped-query attention, per rank) and `o_proj` by rows; the MLP's `gate_proj` and
    `up_proj` by columns and `down_proj` by rows. Two all-reduces per block forward (two in its
    backward). The embedding, the norms and the head stay whole (replicated), as in
    `gpt_tensor_parallel_plan`. The degree must divide the attention heads and the key/value
    heads (`LocalHeads` refuses it when the plan is applied, naming both).

    GPT-2 blocks are refused: their fused `c_attn` (a `Conv1D` holding all queries, then all
    keys, then all values) has no column split that gives each rank whole heads."""

    def by_layer(index: int, module: nn.Module) -> dict[str, Any] | None:
        entries: dict[str, Any] = {}
        for path, sub in module.named_modules():
            children = dict(sub.named_children())
            prefix = f"{path}." if path else ""
            if all(name in children for name in _ATTENTION):
                entries[path] = LocalHeads()  # first: refuses a degree that splits a head
                entries.update({f"{prefix}{name}": ColwiseParallel() for name in _ATTENTION[:3]})
                entries[f"{prefix}o_proj"] = RowwiseParallel()
            elif all(name in children for name in _GATED_MLP):
                entries[f"{prefix}gate_proj"] = ColwiseParallel()
                entries[f"{prefix}up_proj"] = ColwiseParallel()
                entries[f"{prefix}down_proj"] = RowwiseParallel()
            elif "c_attn" in children and "c_proj" in children:
                raise ConfigError(
                    f"tensor_parallel: layer {index} holds a GPT-2 attention ({path}); "
                    "hf_tensor_parallel_plan splits Llama-family blocks only (GPT-2's fused c_attn holds "
                    "all queries, then all keys, then all values, so no column split gives a rank whole "
                    "heads); use tensor_parallel=None"
                )
        if entries and isinstance(module, GraphPiece):
            raise ConfigError(
                f"tensor_parallel: layer {index} is a piece cut at named points (split_points), which runs "
                "the captured operations on the module's tensors, not its submodules, so a plan cannot "
                "split them; split the model at its blocks (pipefold.split without split_points)"
            )
        return entries or None

    return by_layer
