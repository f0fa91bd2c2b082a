"""`hf_tensor_parallel_plan` in one process: which submodules of a split Hugging Face model
(Llama, GPT-2) it splits, and what it refuses (a degree that splits a head, pieces cut at named
points). Exactness at pp=2 x tp=2 is in tests/runtime/test_runtime_exact.py (4 ranks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from pipefold.errors import ConfigError
from pipefold.model import split
from pipefold.runtime import hf_tensor_parallel_plan
from pipefold.runtime.parallel.hf_plan import Conv1DColwise, Conv1DRowwise, GPT2LocalHeads, LocalHeads
from pipefold.runtime.parallel.tensor_parallel import plan_for

pytest.importorskip("transformers")
sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, for model.split_models
from model.split_models import HF_VOCAB, gpt2_model, llama_model  # noqa: E402

INPUTS = torch.zeros(2, 5, dtype=torch.long)


class _Mesh:
    """What LocalHeads reads of a device mesh: its size."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size


def test_the_plan_splits_each_llama_block_megatron_style_and_leaves_the_rest_whole():
    torch.manual_seed(0)
    layers = split(llama_model(2, num_heads=4, num_kv_heads=2), example_inputs=(INPUTS,))
    plan = hf_tensor_parallel_plan()
    assert plan_for(plan, 0, layers[0]) == {}  # embedding (and rotary tables): whole
    assert plan_for(plan, 3, layers[3]) == {}  # final norm and head: whole
    for index in (1, 2):
        entries = plan_for(plan, index, layers[index])
        block = f"model.layers.{index - 1}"
        styles = {name: type(style) for name, style in entries.items()}
        assert styles == {
            f"{block}.self_attn": LocalHeads,
            **{f"{block}.self_attn.{p}": ColwiseParallel for p in ("q_proj", "k_proj", "v_proj")},
            f"{block}.self_attn.o_proj": RowwiseParallel,
            f"{block}.mlp.gate_proj": ColwiseParallel,
            f"{block}.mlp.up_proj": ColwiseParallel,
            f"{block}.mlp.down_proj": RowwiseParallel,
        }
        # The head check runs before the projections are split.
        assert next(iter(entries)) == f"{block}.self_attn"


def test_a_degree_that_splits_a_head_is_refused_naming_the_counts():
    torch.manual_seed(0)
    attention = llama_model(1, num_heads=2, num_kv_heads=1).model.layers[0].self_attn
    with pytest.raises(ConfigError, match=r"tensor_parallel=2: .* 1 key/value heads, .* dividing 2 and 1"):
        LocalHeads()._apply(attention, _Mesh(2))
    attention = llama_model(1, num_heads=4, num_kv_heads=2).model.layers[0].self_attn
    with pytest.raises(ConfigError, match=r"tensor_parallel=8: .* has 4 attention heads"):
        LocalHeads()._apply(attention, _Mesh(8))
    assert LocalHeads()._apply(attention, _Mesh(2)) is attention  # 2 of 4 heads, 1 of 2 key/value heads


def test_head_counts_an_attention_module_holds_become_the_rank_s():
    """Attention modules of older transformers reshape with `self.num_heads` and
    `self.num_key_value_heads`: a tp rank's module must hold its own counts."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head_dim, self.num_heads, self.num_key_value_heads = 4, 4, 2
            self.q_proj, self.k_proj = nn.Linear(16, 16), nn.Linear(16, 8)
            self.v_proj, self.o_proj = nn.Linear(16, 8), nn.Linear(16, 16)

    attention = LocalHeads()._apply(Attention(), _Mesh(2))
    assert (attention.num_heads, attention.num_key_value_heads, attention.head_dim) == (2, 1, 4)


def test_the_plan_splits_gpt2_blocks_by_their_conv1d_projections():
    torch.manual_seed(0)
    layers = split(gpt2_model(2), example_inputs=(INPUTS % HF_VOCAB,))
    plan = hf_tensor_parallel_plan()
    assert plan_for(plan, 0, layers[0]) == {}  # token and position embeddings: whole
    assert plan_for(plan, 3, layers[3]) == {}  # final norm and the tied head: whole
    entries = plan_for(plan, 1, layers[1])
    assert {name: type(style) for name, style in entries.items()} == {
        "transformer.h.0.attn": GPT2LocalHeads,
        "transformer.h.0.attn.c_attn": Conv1DColwise,
        "transformer.h.0.attn.c_proj": Conv1DRowwise,
        "transformer.h.0.mlp.c_fc": Conv1DColwise,
        "transformer.h.0.mlp.c_proj": Conv1DRowwise,
    }
    # c_attn's output is [queries | keys | values]: each rank takes its heads' slice of each.
    assert entries["transformer.h.0.attn.c_attn"].groups == 3
    assert entries["transformer.h.0.mlp.c_fc"].groups == 1
    assert next(iter(entries)) == "transformer.h.0.attn"


def test_gpt2_attention_gets_the_rank_s_heads_and_split_size_or_is_refused():
    torch.manual_seed(0)
    attention = gpt2_model(1).transformer.h[0].attn  # 2 heads of 8 features
    with pytest.raises(ConfigError, match=r"tensor_parallel=4: .* has 2 attention heads"):
        GPT2LocalHeads()._apply(attention, _Mesh(4))
    GPT2LocalHeads()._apply(attention, _Mesh(2))
    assert (attention.num_heads, attention.split_size, attention.head_dim) == (1, 8, 8)
    with pytest.raises(ConfigError, match=r"Conv1DColwise expects a transformers Conv1D"):
        Conv1DColwise()._apply(nn.Linear(4, 4), _Mesh(2))
    with pytest.raises(ConfigError, match=r"48 output features in 3 block\(s\) does not split evenly over 3"):
        Conv1DColwise(groups=3)._apply(attention.c_attn, _Mesh(3))


def test_pieces_cut_at_named_points_are_refused():
    torch.manual_seed(0)
    model = llama_model(2, num_heads=4, num_kv_heads=2)
    layers = split(model, split_points=["model.layers.1"], example_inputs=(INPUTS,))
    with pytest.raises(ConfigError, match=r"layer 0 is a piece cut at named points .*without split_points"):
        plan_for(hf_tensor_parallel_plan(), 0, layers[0])
