"""A small GPT described as a list of layers, so a pipeline can cut it anywhere.

Layer order (num_layers decoder blocks):

    0              TiedLayerSpec("embed", TokenEmbedding)   token ids (B, T) -> (B, T, d_model)
    1              PositionEmbedding                        adds a learned position vector
    2 … N+1        DecoderBlock x num_layers                pre-LN causal attention + MLP
    N+2            nn.LayerNorm                             final norm
    N+3            TiedLayerSpec("embed", …, forward_fn=tied_head)   (B, T, d_model) -> logits (B, T, vocab)

The first and last layers are ONE module (key "embed"): the head multiplies by the
token embedding's weight, so the weights are tied across the first and last stage.
`tie_embeddings=False` makes the head its own `LMHead`.

`attention="unfused"` runs attention and dropout as Megatron-LM's GPT does: explicit QK^T
scores, softmax, dropout on the attention probabilities, and dropout after the attention
projection, after the MLP and on the embeddings' sum, each with probability `dropout`; its
masks are seeded per (step, micro-batch, layer, site) (`pipefold.model.dropout`), so a pipeline
and the same model on one process draw the same ones, recomputation and tensor parallelism
(with or without sequence parallelism) included. It keeps what
Korthikanti et al. 2022 count: sbh(34 + 5as/h) bytes per block at 2 bytes per value.
Only the token table is tied; the position table is its own layer because the head
never uses it, and a tied module whose parameters are partly unused on one owner
would leave that owner with `None` gradients to sum.

`GPT.from_layers(layers, state_dict)` assembles the whole model on one process
(parameter names as the pipeline's `state_dict` gives them) to sample from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from pipefold.errors import ConfigError
from pipefold.model.dropout import SeededDropout, replay_scope
from pipefold.model.spec import LayerSpec, TiedLayerSpec

__all__ = [
    "ATTENTION_CHOICES",
    "TokenEmbedding",
    "LMHead",
    "PositionEmbedding",
    "CausalSelfAttention",
    "DecoderBlock",
    "GPT",
    "gpt_layers",
    "gpt_loss",
    "vocab_parallel_cross_entropy",
    "tied_head",
    "generate",
]

ATTENTION_CHOICES = ("fused", "unfused")
"""`gpt_layers(attention=)`: torch's fused scaled-dot-product attention (no s^2 scores kept, no
dropout inside), or Megatron-LM's unfused attention with its dropouts."""

_INIT_STD = 0.02
"""GPT-2's init scale; with N(0, 1) the tied head would start with logits of size sqrt(d_model)."""


class TokenEmbedding(nn.Embedding):
    """nn.Embedding with GPT-2's small init, because the same table is also the output head."""

    def __init__(self, vocab_size: int, d_model: int) -> None:
        super().__init__(vocab_size, d_model)
        nn.init.normal_(self.weight, std=_INIT_STD)


class LMHead(nn.Linear):
    """The untied output head: (B, T, d_model) -> logits, no bias, GPT-2's init."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)
        nn.init.normal_(self.weight, std=_INIT_STD)


def tied_head(embedding: nn.Module, x: Tensor) -> Tensor:
    """The output head: hidden states times the token table, (B, T, d) -> (B, T, vocab).

    A table split by vocabulary under tensor parallelism (the runtime's `VocabParallel`) gives
    its own head (`vocab_parallel_head`): this rank's slice of the logits, a DTensor."""
    split_head = getattr(embedding, "vocab_parallel_head", None)
    if split_head is not None:
        out: Tensor = split_head(x)
        return out
    weight = embedding.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"tied head expects a module with a weight tensor, got {type(embedding).__name__}")
    # F.linear, not x @ weight.t(): autocast keeps its cast of a leaf weight for the step
    # (runtime.stage.held_casts), and a transposed view would be cast again every forward.
    return F.linear(x, weight)


class PositionEmbedding(nn.Module):
    """Adds a learned vector per position; sequences up to `seq_len` tokens. `dropout` > 0
    drops elements of the sum (Megatron's embedding dropout, seeded as layer `layer`)."""

    def __init__(self, seq_len: int, d_model: int, dropout: float = 0.0, layer: int = 1) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.position = nn.Parameter(torch.randn(seq_len, d_model) * _INIT_STD)
        self.dropout = SeededDropout(dropout, layer, 0) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        if length > self.seq_len:
            raise ConfigError(
                f"sequence length {length} exceeds the model's seq_len={self.seq_len}; "
                "crop the input or build the model with a larger seq_len"
            )
        out: Tensor = self.dropout(x + self.position[:length])
        return out


def _attention_core(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # torch's CPU flash-attention backward is several times slower in 16 bits than in fp32,
        # which made bf16 slower than fp32 for the main job's model (docs/decisions.md,
        # "16-bit attention on CPU"): the core runs in fp32, outside autocast, and returns the
        # inputs' dtype, so the projections around it still compute in 16 bits.
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _unfused_core(q: Tensor, k: Tensor, v: Tensor, dropout: Callable[[Tensor], Tensor]) -> Tensor:
    """Megatron's attention core: scaled QK^T scores, a causal mask added (an addition keeps
    nothing for its backward), softmax (keeps its output), dropout on the probabilities (keeps
    its 1-byte mask), and the dropped probabilities times V (keeps both)."""
    length = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    causal = torch.full((length, length), float("-inf"), device=q.device, dtype=scores.dtype).triu_(1)
    probs = dropout(torch.softmax(scores + causal, dim=-1))
    return torch.matmul(probs, v)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused input projection.

    `head_qkv`'s output features are grouped by head, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...],
    each of `head_dim` features, rather than [all q | all k | all v]: a column split of the
    projection (`ColwiseParallel`) then gives each tensor-parallel rank whole heads with
    their q, k and v, and `proj` split by rows (`RowwiseParallel`) sums the heads' outputs
    (Megatron's split). The forward reads how many heads it holds from the projection's
    output width, so the same module runs whole or split.

    `recompute_core = True` (what `LayoutOptions(recompute="selective")` sets) keeps only q, k
    and v for the backward and runs the attention core (QK^T, softmax, attention over V) again
    there (Korthikanti et al. 2022's selective recomputation); the projections keep theirs.

    `attention="unfused"` computes the core as Megatron does (`_unfused_core`), with `dropout`
    on the attention probabilities (seeded as site 1 of layer `layer`, each head's mask keyed by
    its global index, so a tensor-parallel rank draws its heads' one-process masks); the
    recomputation of the core redraws the same masks.
    """

    recompute_core: bool

    def __init__(
        self, d_model: int, num_heads: int, *, attention: str = "fused", dropout: float = 0.0, layer: int = 0
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_CHOICES:
            raise ConfigError(
                f"CausalSelfAttention: attention = {attention!r}; use one of {', '.join(ATTENTION_CHOICES)}"
            )
        self.recompute_core = False
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.head_qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.unfused = attention == "unfused"
        self.attention_dropout = (
            SeededDropout(dropout, layer, 1, head_dim=1) if dropout > 0 else nn.Identity()
        )

    def _first_head(self, num_local_heads: int) -> int:
        """The global index of this rank's first head: a column split of `head_qkv` (tensor
        parallelism, whole heads per rank in rank order) gives rank r heads from r * n on."""
        weight = self.head_qkv.weight
        if isinstance(weight, DTensor):
            return int(weight.device_mesh.get_local_rank()) * num_local_heads
        return 0

    def _drop_probabilities(self, probs: Tensor) -> Tensor:
        dropout = self.attention_dropout
        if not isinstance(dropout, SeededDropout):
            return probs
        out: Tensor = dropout(probs, self._first_head(probs.shape[1]))
        return out

    def _core(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.unfused:
            return _unfused_core(q, k, v, self._drop_probabilities)
        return _attention_core(q, k, v)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        qkv = self.head_qkv(x)
        num_local_heads = qkv.shape[-1] // (3 * self.head_dim)
        q, k, v = qkv.view(batch, length, num_local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        if self.unfused:
            # Whole tensors of their own, so the products keep q, k and v (3 sbh), not copies
            # of them beside the qkv output.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if self.recompute_core and torch.is_grad_enabled():
            y = torch.utils.checkpoint.checkpoint(
                self._core, q, k, v, use_reentrant=False, context_fn=replay_scope
            )
        else:
            y = self._core(q, k, v)
        out: Tensor = self.proj(y.transpose(1, 2).reshape(batch, length, num_local_heads * self.head_dim))
        return out


class DecoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    `dropout` > 0 drops elements of each residual branch's output while training (GPT-2's
    residual dropout); 0 adds no module, so the block's parameters and state dict are unchanged.
    With `attention="unfused"` the branches' dropouts are seeded (sites 2 and 3 of layer `layer`)
    and the attention probabilities are dropped too (`CausalSelfAttention`).
    """

    def __init__(
        self, d_model: int, num_heads: int, num_layers: int, dropout: float = 0.0, *,
        attention: str = "fused", layer: int = 0,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, attention=attention, dropout=dropout, layer=layer)
        self.dropout: nn.Module = nn.Identity()
        self.mlp_dropout: nn.Module | None = None  # the fused block drops both branches with one module
        if dropout > 0 and attention == "unfused":
            self.dropout = SeededDropout(dropout, layer, 2)
            self.mlp_dropout = SeededDropout(dropout, layer, 3)
        elif dropout > 0:
            self.dropout = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.fc_out = nn.Linear(4 * d_model, d_model)
        for linear in (self.attn.head_qkv, self.attn.proj, self.fc, self.fc_out):
            nn.init.normal_(linear.weight, std=_INIT_STD)
            nn.init.zeros_(linear.bias)
        # GPT-2: residual projections scaled by 1/sqrt(2 * depth) so the residual stream's
        # variance does not grow with the number of blocks.
        for residual in (self.attn.proj, self.fc_out):
            nn.init.normal_(residual.weight, std=_INIT_STD / math.sqrt(2 * num_layers))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        mlp_dropout = self.dropout if self.mlp_dropout is None else self.mlp_dropout
        out: Tensor = x + mlp_dropout(self.fc_out(F.gelu(self.fc(self.ln2(x)))))
        return out


def gpt_layers(
    vocab_size: int,
    d_model: int,
    num_heads: int,
    num_layers: int,
    seq_len: int,
    *,
    tie_embeddings: bool = True,
    dropout: float = 0.0,
    attention: str = "fused",
) -> list[LayerSpec]:
    """The GPT as `num_layers + 4` lazily built layers (see the module docstring).

    `dropout`: the dropout probability while training (0 = none): the blocks' residual dropout
    with fused attention; with `attention="unfused"` Megatron's dropouts (attention
    probabilities, after the projection and the MLP, on the embeddings), seeded.
    """
    for name, value in (
        ("vocab_size", vocab_size),
        ("d_model", d_model),
        ("num_heads", num_heads),
        ("num_layers", num_layers),
        ("seq_len", seq_len),
    ):
        if value < 1:
            raise ConfigError(f"gpt_layers: {name} must be >= 1; got {value}")
    if d_model % num_heads != 0:
        raise ConfigError(
            f"gpt_layers: d_model={d_model} is not divisible by num_heads={num_heads}; "
            "pick num_heads dividing d_model (e.g. d_model=128, num_heads=4)"
        )
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"gpt_layers: dropout must be in [0, 1); got {dropout} (e.g. 0.1, or 0 for none)")
    if attention not in ATTENTION_CHOICES:
        choices = ", ".join(repr(choice) for choice in ATTENTION_CHOICES)
        raise ConfigError(f"gpt_layers: attention = {attention!r}; use one of {choices}")
    # Without dropout the spec is the one it always was (no extra argument).
    block_args: tuple[float, ...] = (dropout,) if dropout > 0 else ()
    layers: list[LayerSpec] = [TiedLayerSpec("embed", TokenEmbedding, vocab_size, d_model)]
    if attention == "fused":
        layers.append(LayerSpec(PositionEmbedding, seq_len, d_model))
        layers += [
            LayerSpec(DecoderBlock, d_model, num_heads, num_layers, *block_args) for _ in range(num_layers)
        ]
    else:
        # Each dropout seeded by its layer's index in this list (pipefold.model.dropout).
        layers.append(LayerSpec(PositionEmbedding, seq_len, d_model, dropout, layer=1))
        layers += [
            LayerSpec(DecoderBlock, d_model, num_heads, num_layers, dropout, attention="unfused", layer=2 + i)
            for i in range(num_layers)
        ]
    layers.append(LayerSpec(nn.LayerNorm, d_model))
    if tie_embeddings:
        layers.append(TiedLayerSpec("embed", TokenEmbedding, vocab_size, d_model, forward_fn=tied_head))
    else:
        layers[0] = LayerSpec(TokenEmbedding, vocab_size, d_model)
        layers.append(LayerSpec(LMHead, d_model, vocab_size))
    return layers


def gpt_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over every position of the micro-batch; on logits split by
    vocabulary (a DTensor, from a vocabulary-parallel head) `vocab_parallel_cross_entropy`."""
    if isinstance(logits, DTensor):
        return vocab_parallel_cross_entropy(logits, targets)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of rows of logits split by vocabulary over `group` (Megatron's): the
    row maximum, the target's logit and the sum of exponentials are all-reduced, so no rank
    holds the whole rows; the backward is softmax - one_hot on this rank's columns."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, targets: Tensor, start: int, group: Any
    ) -> Tensor:
        columns = logits.shape[-1]
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        outside = (targets < start) | (targets >= start + columns)
        local_targets = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        # One collective for both sums.
        sums = torch.stack([target_logit, sum_exp])
        dist.all_reduce(sums, group=group)
        target_logit, sum_exp = sums[0], sums[1]
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_targets, outside)
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        softmax, local_targets, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        hit = (~outside).to(softmax.dtype)
        grad_logits.scatter_add_(-1, local_targets.unsqueeze(-1), -hit.unsqueeze(-1))
        grad_logits.mul_(grad / softmax.shape[0])
        return grad_logits, None, None, None


def vocab_parallel_cross_entropy(logits: DTensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (..., vocab) held as a DTensor split along the vocabulary
    (`Shard(-1)` on a 1-D mesh) against whole `targets` (...): what `F.cross_entropy` gives on
    the gathered logits, without gathering them. (torch's `loss_parallel()` computes the same,
    but its backward must run inside the same context, which a pipeline's separate backward
    actions do not.)"""
    placements = tuple(logits.placements)
    last = logits.dim() - 1
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim in (-1, last)):
        raise ConfigError(
            f"vocab_parallel_cross_entropy: logits are placed {placements}; it takes logits split "
            "along the last (vocabulary) dim on a 1-D mesh, Shard(-1)"
        )
    mesh = logits.device_mesh
    local = logits.to_local()
    if local.shape[-1] * mesh.size() != logits.shape[-1]:
        raise ConfigError(
            f"vocab_parallel_cross_entropy: a vocabulary of {logits.shape[-1]} does not split evenly "
            f"over {mesh.size()} ranks; pad the vocabulary to a multiple of {mesh.size()}"
        )
    start = mesh.get_local_rank() * local.shape[-1]
    loss: Tensor = _VocabParallelCrossEntropy.apply(  # type: ignore[no-untyped-call]
        local.reshape(-1, local.shape[-1]), targets.reshape(-1), start, mesh.get_group()
    )
    return loss


class GPT(nn.Module):
    """The whole layer list on one process; parameter names match the pipeline's ("0.weight").

    A tied key is held once, under the index of its first occurrence, as the pipeline
    names it, so a state dict gathered from the ranks loads with `strict=True`.
    """

    def __init__(
        self, layers: Sequence[LayerSpec], device: torch.device | str = "cpu", *, seed: int = 0
    ) -> None:
        super().__init__()
        self.specs = list(layers)
        self.blocks = nn.ModuleDict()
        first_of_key: dict[str, int] = {}
        self._source: list[int] = []
        for index, spec in enumerate(self.specs):
            key = spec.key if isinstance(spec, TiedLayerSpec) else None
            if key is not None and key in first_of_key:
                self._source.append(first_of_key[key])
                continue
            if key is not None:
                first_of_key[key] = index
            # Seeded like pipefold.model.materialize, so an unloaded GPT starts from the
            # same weights as a pipeline built with the same seed.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + index)
                self.blocks[str(index)] = spec.build(device)
            self._source.append(index)

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[LayerSpec],
        state_dict: dict[str, Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> GPT:
        model = cls(layers, device)
        if state_dict is not None:
            model.blocks.load_state_dict(state_dict, strict=True)
        return model

    @property
    def seq_len(self) -> int:
        for module in self.blocks.values():
            if isinstance(module, PositionEmbedding):
                return module.seq_len
        raise ConfigError("this layer list has no PositionEmbedding; build it with gpt_layers()")

    def forward(self, ids: Tensor) -> Tensor:
        x = ids
        for spec, source in zip(self.specs, self._source, strict=True):
            module = self.blocks[str(source)]
            forward_fn = spec.forward_fn if isinstance(spec, TiedLayerSpec) else None
            x = forward_fn(module, x) if forward_fn is not None else module(x)
        return x


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: Tensor,
    num_tokens: int,
    temperature: float = 1.0,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample `num_tokens` tokens after `prompt_ids` (shape (T,) or (B, T)); returns the ids with them.

    The context is cropped to the model's `seq_len`. temperature 0 picks the argmax.
    """
    if num_tokens < 0:
        raise ConfigError(f"generate: num_tokens must be >= 0; got {num_tokens}")
    if temperature < 0:
        raise ConfigError(f"generate: temperature must be >= 0; got {temperature} (use 0 for greedy)")
    was_training = model.training
    model.eval()
    ids = prompt_ids.unsqueeze(0) if prompt_ids.dim() == 1 else prompt_ids
    if ids.shape[1] == 0:
        raise ConfigError("generate: prompt_ids is empty; give at least one token")
    seq_len = model.seq_len
    for _ in range(num_tokens):
        logits = model(ids[:, -seq_len:])[:, -1, :]
        if temperature == 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
    model.train(was_training)
    return ids.squeeze(0) if prompt_ids.dim() == 1 else ids
