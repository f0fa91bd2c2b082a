"""Megatron's vocabulary-parallel embedding and output layer: each tensor-parallel rank holds
vocab / tp rows of the token table (and of the head), so neither end of the pipeline holds a
whole vocab x d_model table.

    plan = gpt_tensor_parallel_plan(vocab_parallel=True)  # VocabParallel() on the table and head
    Pipeline(gpt_layers(...), loss_fn=gpt_loss, parallel=ParallelOptions(tensor_parallel=plan, ...))

`VocabParallel()` splits an `nn.Embedding` (a lookup: each rank looks up the ids in its rows,
zeroes the others and the output is all-reduced over tp) or a bias-free `nn.Linear` head (its
input's gradient is all-reduced in the backward; its output is the rank's slice of the logits,
a `DTensor` placed `Shard(-1)`). A tied embedding whose `vocab_parallel_head` the model's head
function calls (the zoo's `tied_head`) gives the same vocabulary-split head on the last stage.
The loss on vocabulary-split logits is `pipefold.model.zoo.gpt.vocab_parallel_cross_entropy`
(what `gpt_loss` runs for a DTensor): the maximum and the sum of exponentials are all-reduced,
no rank holds the whole logits. Weights are `Shard(0)` DTensors, as under `RowwiseParallel`,
so checkpoints, optimizers and the tied-gradient exchange (of each rank's own rows) see nothing
new. Design notes: docs/parallelism.md, "Vocabulary-parallel embedding and head".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from pipefold.errors import ConfigError

__all__ = ["VocabParallel", "check_vocab_divisible"]

_SPLIT = "_pipefold_vocab_parallel"
"""Set on a module once split: a tied module held twice by one rank is split once."""


def check_vocab_divisible(vocab_size: int, num_shards: int, field: str = "vocab_size") -> None:
    """Refuse a vocabulary that the tensor-parallel ranks cannot split evenly."""
    if vocab_size % num_shards != 0:
        padded = -(-vocab_size // num_shards) * num_shards
        raise ConfigError(
            f"vocabulary-parallel embedding: {field}={vocab_size} does not split evenly over "
            f"{num_shards} tensor-parallel ranks; pad the vocabulary to a multiple of {num_shards} "
            f"(e.g. {padded}: unused rows are never looked up) or turn vocabulary parallelism off"
        )


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in the forward, identity in the backward (Megatron's g)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


class _CopyToRanks(torch.autograd.Function):
    """Identity in the forward, all-reduce (sum) of the gradient in the backward (Megatron's f):
    every rank's slice of the logits contributes to the input's gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _local(tensor: Tensor) -> Tensor:
    """This rank's rows (differentiably: the gradient comes back as the DTensor's)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class VocabParallel(ParallelStyle):
    """Split a token embedding or a bias-free output head by vocabulary rows over the tp mesh.

    The module must have a `weight` of shape (vocab, d_model) whose rows divide by the mesh
    size (else a ConfigError naming the fix: pad the vocabulary)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if getattr(module, _SPLIT, False):
            return module
        is_embedding = isinstance(module, nn.Embedding)
        if not (is_embedding or (isinstance(module, nn.Linear) and module.bias is None)):
            raise ConfigError(
                f"VocabParallel splits an nn.Embedding or a bias-free nn.Linear output head; got "
                f"{type(module).__name__}: keep this layer out of the plan"
            )
        if is_embedding and (module.padding_idx is not None or module.max_norm is not None or module.sparse):
            raise ConfigError(
                "VocabParallel: the embedding has padding_idx, max_norm or sparse set, which the "
                "vocabulary split does not run; build it without them"
            )
        weight = module.weight
        num_shards, rank = int(device_mesh.size()), int(device_mesh.get_local_rank())
        vocab = int(weight.shape[0])
        check_vocab_divisible(vocab, num_shards)
        rows = vocab // num_shards
        start, group = rank * rows, device_mesh.get_group()
        # Every tp rank built the whole table from the same seed: keep its rows, no communication.
        shard = distribute_tensor(weight.detach(), device_mesh, [Shard(0)], src_data_rank=None)
        module.register_parameter("weight", nn.Parameter(shard, requires_grad=weight.requires_grad))

        def lookup(ids: Tensor) -> Tensor:
            outside = (ids < start) | (ids >= start + rows)
            found = F.embedding((ids - start).masked_fill(outside, 0), _local(module.weight))
            found = found.masked_fill(outside.unsqueeze(-1), 0.0)
            out: Tensor = _SumOverRanks.apply(found, group)  # type: ignore[no-untyped-call]
            return out

        def head(x: Tensor) -> Tensor:
            copied: Tensor = _CopyToRanks.apply(x, group)  # type: ignore[no-untyped-call]
            logits = F.linear(copied, _local(module.weight))
            return DTensor.from_local(logits, device_mesh, [Shard(logits.dim() - 1)], run_check=False)

        # On the instance: this module's forward, not every nn.Embedding's.
        module.forward = lookup if is_embedding else head  # type: ignore[method-assign]
        module.vocab_parallel_head = head  # the tied head's projection (zoo.gpt.tied_head)
        setattr(module, _SPLIT, True)
        return module
