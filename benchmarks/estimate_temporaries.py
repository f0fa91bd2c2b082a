"""`GptEstimate`'s backward temporaries per layer against what `pipefold profile` measures on CPU.

    python benchmarks/estimate_temporaries.py            # every shape, fp32 and bf16, fused and unfused
    python benchmarks/estimate_temporaries.py --quick    # two shapes
    python benchmarks/estimate_temporaries.py --selective    # fp32 unfused blocks, attention core recomputed
    python benchmarks/estimate_temporaries.py --activations  # saved bytes per layer instead (cpu hardware)

For each shape of the built-in GPT (one block, vocabulary 256; d_model, heads, seq_len and rows
varied), precision (fp32; bf16: autocast over fp32 weights, as `pipefold train --precision bf16`)
and attention (fused; unfused with dropout 0.1, as `GptEstimate(megatron=True)` prices it), the
profile measures each layer's `backward_temporary_bytes` from the CPU allocator's events
(`pipefold.runtime.profiling`) and the estimate gives its formula
(`pipefold.plan.estimate_temporaries`, through `GptEstimate.backward_temporaries` at tp = 1; the
temporaries do not depend on the hardware file, h100-80gb gives the bf16 dtype). Prints one row per
(shape, precision, attention) with formula / measured per layer and the worst error.
`--activations` compares each layer's saved bytes instead (`activation_bytes`, and in bf16
`activation_bytes_from_boundary`: from the layer's input cast to 16 bits, as a stage's first layer
receives it), with the estimate on the `cpu` preset (the CPU's saved dtypes: its norms keep a 16-bit
input as it is, the built-in GPT's fused core saves fp32).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LAYERS = ("embed", "position", "block", "norm", "head")
SHAPES = (  # d_model, heads, seq_len, rows
    (64, 4, 32, 2), (64, 4, 32, 4), (128, 4, 32, 2), (64, 8, 64, 2), (32, 4, 128, 4),
    (32, 8, 256, 2), (64, 4, 256, 2), (128, 8, 128, 2),
)
QUICK = ((64, 4, 32, 2), (32, 8, 256, 2))
VOCAB = 256


def _profiled(d_model: int, heads: int, seq_len: int, rows: int, precision: str, attention: str) -> list[Any]:
    """`pipefold profile` of a one-block GPT of these sizes on random tokens, with its loss."""
    import torch

    from pipefold.model.zoo.gpt import gpt_layers, gpt_loss
    from pipefold.runtime import profile

    layers = gpt_layers(VOCAB, d_model, heads, 1, seq_len, attention=attention,
                        dropout=0.1 if attention == "unfused" else 0.0)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (rows, seq_len), generator=generator)
    targets = torch.randint(0, VOCAB, (rows, seq_len), generator=generator)
    found = profile(layers, tokens, num_repeats=1, loss_fn=gpt_loss, target=targets, precision=precision)
    return list(found)


def measured(d_model: int, heads: int, seq_len: int, rows: int, precision: str, attention: str) -> list[int]:
    found = _profiled(d_model, heads, seq_len, rows, precision, attention)
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


def measured_activations(d_model: int, heads: int, seq_len: int, rows: int, precision: str, attention: str
                         ) -> list[tuple[int, int]]:
    """Per layer, (activation_bytes, activation_bytes_from_boundary) as `pipefold profile` measures
    them on CPU (the latter: from the layer's input cast to 16 bits; the chain's in fp32)."""
    found = _profiled(d_model, heads, seq_len, rows, precision, attention)
    return [(layer.activation_bytes, layer.activation_bytes_from_boundary or layer.activation_bytes)
            for layer in found]


def formula_activations(d_model: int, heads: int, seq_len: int, rows: int, precision: str, attention: str
                        ) -> list[tuple[int, int]]:
    """Per layer, `GptEstimate`'s (activation_bytes, its from-boundary bytes) on the `cpu` hardware
    preset (with a peak for the 16-bit dtype: the preset gives fp32 only), fp32 weights."""
    from dataclasses import replace

    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.hardware import load_hardware
    from pipefold.simulate import Link

    cpu = load_hardware("cpu")
    hardware = replace(cpu, peak_flops={**cpu.peak_flops, precision: cpu.peak(cpu.default_dtype)})
    estimate = GptEstimate(num_layers=1, d_model=d_model, num_heads=heads, seq_len=seq_len, vocab_size=VOCAB,
                           hardware=hardware, dtype=precision, parameter_bytes=4,
                           megatron=attention == "unfused")
    return [(layer.activation_bytes, layer.activations_from_boundary)
            for layer in estimate.at(rows, 1, Link(), False).layers]


def activations(shapes: tuple[tuple[int, int, int, int], ...]) -> None:
    """Formula / measured saved bytes per layer, on the model's chain and (bf16) from a 16-bit input."""
    print(f"# load average {os.getloadavg()[0]:.2f}; formula / measured saved KiB per layer "
          f"({', '.join(LAYERS)}); chain, then from a 16-bit stage input (bf16 only); vocab {VOCAB}")
    print(f"{'d,a,s,b':>14} {'prec':>5} {'attn':>8} {'from':>5} "
          + " ".join(f"{name:>15}" for name in LAYERS) + "  worst")
    worst_all = 0.0
    for shape in shapes:
        for precision in ("fp32", "bf16"):
            for attention in ("fused", "unfused"):
                have = measured_activations(*shape, precision, attention)
                want = formula_activations(*shape, precision, attention)
                for side, name in ((0, "chain"), (1, "16bit")):
                    if side and precision == "fp32":
                        continue
                    pairs = [(w[side], h[side]) for w, h in zip(want, have, strict=True)]
                    # The token embedding's int64 ids (s b 8 bytes) are left out of the estimate.
                    errors = [w / h - 1 for w, h in pairs[1:] if h]
                    worst = max(errors, key=abs)
                    worst_all = max(worst_all, abs(worst))
                    cells = " ".join(f"{w / 1024:6.1f}/{h / 1024:<6.1f}K"[:15].rjust(15) for w, h in pairs)
                    print(f"{','.join(map(str, shape)):>14} {precision:>5} {attention:>8} {name:>5} {cells}  "
                          f"{worst:+.1%}", flush=True)
    print(f"# worst error {worst_all:.1%} (the layers after the token embedding that save something)")


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
    parser.add_argument("--activations", action="store_true",
                        help="each layer's saved bytes (chain and from a 16-bit input) instead, cpu hardware")
    args = parser.parse_args()
    if args.activations:
        activations(QUICK if args.quick else SHAPES)
        return 0
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
