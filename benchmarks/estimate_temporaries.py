"""`GptEstimate`'s backward temporaries per layer against what `pipefold profile` measures on CPU.

    python benchmarks/estimate_temporaries.py            # every shape, fp32 and bf16, fused and unfused
    python benchmarks/estimate_temporaries.py --quick    # two shapes
    python benchmarks/estimate_temporaries.py --selective    # fp32 unfused blocks, attention core recomputed

For each shape of the built-in GPT (one block, vocabulary 256; d_model, heads, seq_len and rows
varied), precision (fp32; bf16: autocast over fp32 weights, as `pipefold train --precision bf16`)
and attention (fused; unfused with dropout 0.1, as `GptEstimate(megatron=True)` prices it), the
profile measures each layer's `backward_temporary_bytes` from the CPU allocator's events
(`pipefold.runtime.profiling`) and the estimate gives its formula
(`pipefold.plan.estimate_temporaries`, through `GptEstimate.backward_temporaries` at tp = 1; the
temporaries do not depend on the hardware file, h100-80gb gives the bf16 dtype). Prints one row per
(shape, precision, attention) with formula / measured per layer and the worst error.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS = ("embed", "position", "block", "norm", "head")
SHAPES = (  # d_model, heads, seq_len, rows
    (64, 4, 32, 2), (64, 4, 32, 4), (128, 4, 32, 2), (64, 8, 64, 2), (32, 4, 128, 4),
    (32, 8, 256, 2), (64, 4, 256, 2), (128, 8, 128, 2),
)
QUICK = ((64, 4, 32, 2), (32, 8, 256, 2))
VOCAB = 256


def measured(d_model: int, heads: int, seq_len: int, rows: int, precision: str, attention: str) -> list[int]:
    import torch

    from pipefold.model.zoo.gpt import gpt_layers, gpt_loss
    from pipefold.runtime import profile

    layers = gpt_layers(VOCAB, d_model, heads, 1, seq_len, attention=attention,
                        dropout=0.1 if attention == "unfused" else 0.0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (rows, seq_len), generator=generator)
    targets = torch.randint(0, VOCAB, (rows, seq_len), generator=generator)
    found = profile(layers, tokens, num_repeats=1, loss_fn=gpt_loss, target=targets, precision=precision)
    return [layer.backward_temporary_bytes for layer in found]


def formula(d_model: int, heads: int, seq_len: int, rows: int, precision: str, attention: str) -> list[int]:
    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.hardware import load_hardware

    estimate = GptEstimate(num_layers=1, d_model=d_model, num_heads=heads, seq_len=seq_len, vocab_size=VOCAB,
                           hardware=load_hardware("h100-80gb"), dtype=precision, parameter_bytes=4,
                           megatron=attention == "unfused")
    return [total for total, _ in estimate.backward_temporaries(rows, 1, False)]


def measured_selective(d_model: int, heads: int, seq_len: int, rows: int) -> int:
    """An fp32 unfused block's backward temporaries with its attention core recomputed (what
    `--recompute selective` sets), measured as the profile measures a layer (its private helper:
    `profile` builds its layers as given, without the flag)."""
    import functools

    import torch

    from pipefold.model.build import as_layers, build_reference
    from pipefold.model.zoo.gpt import DecoderBlock, gpt_layers
    from pipefold.runtime import profiling

    layers = gpt_layers(VOCAB, d_model, heads, 1, seq_len, attention="unfused", dropout=0.1)
    description = as_layers(layers)
    model = build_reference(description, torch.device("cpu"), seed=0)
    block = model[2]
    assert isinstance(block, DecoderBlock)
    block.attn.recompute_core = True
    for parameter in block.parameters():  # held, as every backward but a step's first meets them
        parameter.grad = torch.zeros_like(parameter)
    forward = functools.partial(profiling._apply, None)
    hidden = torch.randn(rows, seq_len, d_model)
    return profiling._layer_backward_bytes(torch.device("cpu"), forward, description[2], block, hidden)


def selective(shapes: tuple[tuple[int, int, int, int], ...]) -> None:
    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.hardware import load_hardware

    print(f"{'d,a,s,b':>14} {'formula KiB':>12} {'measured KiB':>13}  error   "
          "(fp32 unfused block, core recomputed)")
    for shape in shapes:
        d_model, heads, seq_len, rows = shape
        estimate = GptEstimate(num_layers=1, d_model=d_model, num_heads=heads, seq_len=seq_len,
                               vocab_size=VOCAB, hardware=load_hardware("cpu"), megatron=True,
                               recompute_attention=True)
        want = estimate.backward_temporaries(rows, 1, False)[2][0]
        have = measured_selective(*shape)
        print(f"{','.join(map(str, shape)):>14} {want / 1024:12.0f} {have / 1024:13.0f}  "
              f"{want / have - 1:+.1%}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--selective", action="store_true",
                        help="fp32 unfused blocks with the attention core recomputed instead")
    args = parser.parse_args()
    if args.selective:
        selective(QUICK if args.quick else SHAPES)
        return 0
    print(f"# load average {os.getloadavg()[0]:.2f}; formula / measured bytes per layer "
          f"({', '.join(LAYERS)}); vocab {VOCAB}")
    print(f"{'d,a,s,b':>14} {'prec':>5} {'attn':>8} "
          + " ".join(f"{name:>15}" for name in LAYERS) + "  worst")
    worst_all = 0.0
    for shape in QUICK if args.quick else SHAPES:
        for precision in ("fp32", "bf16"):
            for attention in ("fused", "unfused"):
                have = measured(*shape, precision, attention)
                want = formula(*shape, precision, attention)
                errors = [w / h - 1 for w, h in zip(want, have, strict=True)]
                worst = max(errors, key=abs)
                worst_all = max(worst_all, abs(worst))
                cells = " ".join(f"{w / 1024:6.0f}/{h / 1024:<6.0f}K"[:15].rjust(15)
                                 for w, h in zip(want, have, strict=True))
                print(f"{','.join(map(str, shape)):>14} {precision:>5} {attention:>8} {cells}  {worst:+.1%}",
                      flush=True)
    print(f"# worst error {worst_all:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
