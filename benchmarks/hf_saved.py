"""`hf_costs`' saved bytes per layer against what `pipefold profile` measures of the real split
Hugging Face model on CPU.

    python benchmarks/hf_saved.py                            # the estimate of this tree
    git show f801734:pipefold/plan/hf_estimate.py > /tmp/hf_before.py
    python benchmarks/hf_saved.py --before /tmp/hf_before.py # and an older hf_estimate beside it

For tiny GPT-2 (d 32, 4 heads; transformers' defaults: gelu_new, dropouts 0.1; and a quiet variant:
gelu_pytorch_tanh, no dropout) and Llama (d 32, 4 query and 2 key/value heads, I 64; without and
with attention dropout 0.1) configs, random weights, in fp32 and under bf16 autocast over fp32
weights (as `pipefold train --precision bf16`), at three sequence lengths (so T and T² terms part),
`--rows` rows a micro-batch: per layer (prefix, block, suffix) the measured `activation_bytes`
and the estimate's for those rows (the suffix's without the logits, which the estimate adds for the
loss and the profile counts as the loss's). The model is built as `pipefold train --model` builds
it (`pipefold.hf.model.load_causal_lm`: train mode, the default sdpa attention).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pipefold.hf.model import load_causal_lm
from pipefold.model.split import SplitPiece
from pipefold.plan.hf_estimate import hf_costs
from pipefold.runtime import profile

VOCAB = 64
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": VOCAB,
        "n_positions": 128}
LLAMA = {
    "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
CONFIGS = {
    "gpt2 (defaults)": GPT2,
    "gpt2 (quiet)": {**GPT2, "activation_function": "gelu_pytorch_tanh", "attn_pdrop": 0.0,
                     "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "llama": LLAMA,
    "llama (attention dropout)": {**LLAMA, "attention_dropout": 0.1},
}


def _measured(config: dict[str, Any], seq_len: int, rows: int, precision: str) -> list[int]:
    import transformers

    made = transformers.CONFIG_MAPPING[config["model_type"]](
        **{key: value for key, value in config.items() if key != "model_type"})
    lm = load_causal_lm(made, seq_len=seq_len)
    for layer in lm.layers:
        assert isinstance(layer, SplitPiece)
        layer.materialize_("cpu")
    ids = torch.randint(0, VOCAB, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    return [layer.activation_bytes for layer in profile(lm.layers, ids, num_repeats=1, precision=precision)]


def _estimated(costs_of: Callable[..., Any], config: dict[str, Any], seq_len: int, rows: int,
               b: int) -> list[int]:
    costs = costs_of(config, seq_len=seq_len, bytes_per_value=b, parameter_bytes_per_value=4)
    saved = [rows * layer.activation_bytes for layer in costs.layers]
    # An estimate older than `loss_bytes` priced the loss's logits in the suffix.
    logits = 0 if getattr(costs, "loss_bytes", 0) else rows * seq_len * VOCAB * b
    return [saved[0], saved[1], saved[-1] - logits]  # prefix, a block, suffix less logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="an older pipefold/plan/hf_estimate.py to compare")
    parser.add_argument("--rows", type=int, default=2)
    args = parser.parse_args()
    before = None
    if args.before is not None:
        spec = importlib.util.spec_from_file_location("hf_before", args.before)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        before = module.hf_costs
    extra = " before | error |" if before else ""
    print("| config | precision | T | layer | measured | estimate | error |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|---|" if before else ""))
    for name, config in CONFIGS.items():
        for precision, b in (("fp32", 4), ("bf16", 2)):
            for seq_len in (16, 32, 64):
                measured = _measured(config, seq_len, args.rows, precision)
                ours = _estimated(hf_costs, config, seq_len, args.rows, b)
                old = _estimated(before, config, seq_len, args.rows, b) if before else None
                for index, layer in enumerate(("prefix", "block", "suffix")):
                    truth = measured[(0, 1, -1)[index]]
                    row = (f"| {name} | {precision} | {seq_len} | {layer} | {truth} | {ours[index]} | "
                           f"{ours[index] / truth - 1:+.1%} |")
                    if old is not None:
                        row += f" {old[index]} | {old[index] / truth - 1:+.1%} |"
                    print(row, flush=True)


if __name__ == "__main__":
    main()
