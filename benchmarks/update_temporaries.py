"""The update's temporaries, measured, against what the plan prices (`pipefold.plan.update_memory`).

    python benchmarks/update_temporaries.py                 # CPU: torch's profiler, the tiny and the GPU GPT
    python benchmarks/update_temporaries.py --device cuda   # the CUDA caching allocator's peak

For the built-in GPT (untied head) at two sizes: the gradient norm `pipefold train` computes
(`pipefold.runtime.clip.GradientScope.total_norm`) and one AdamW step with its parameter groups
(`pipefold.job.optim.parameter_groups`), in fp32 and in bf16-pure (`fp32_master_weights`), on
torch's default path for the device (CPU: single-tensor; CUDA: foreach) and the other one
forced. Each row: the most bytes allocated at once beyond what was live before (CPU: the
profiler's memory events; CUDA: `max_memory_allocated` after `reset_peak_memory_stats`), what
torch's code allocates by the formulas (`exact`: the larger group's list, or a parameter's
temporaries beside the previous one's, in its group's order), what the plan prices (`plan`: the
rank's larger group's list, a group's two largest tensors: `pipefold.plan.memory.update_bytes`)
and what it priced before it knew the groups (`before`: the whole rank's list, the model's two
largest tensors). A second table: fp16's overflow check and unscale
(`pipefold.runtime.loss_scale.DynamicLossScale`, fp32 gradients as `--precision fp16` keeps them)
beside the gradient norm that follows them. Allocation sizes are deterministic; a benchmark for
its tables (the same checks on a small model are tests/runtime/test_update_temporaries.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from pipefold.job.optim import no_decay, parameter_groups
from pipefold.model.build import as_layers, build_reference
from pipefold.model.zoo import gpt_layers
from pipefold.plan import LayerCost, ModelCosts, RankMemory
from pipefold.plan.memory import update_bytes
from pipefold.plan.update_memory import gradient_norm_bytes, overflow_check_bytes, update_temporaries
from pipefold.runtime.clip import GradientScope
from pipefold.runtime.loss_scale import DynamicLossScale
from pipefold.runtime.master import fp32_master_weights

SHAPES = {"tiny": (2, 64, 4, 32), "gpu": (4, 1024, 16, 128), "vocab": (2, 256, 4, 64)}
"""(layers, d_model, heads, seq_len) of benchmarks/planner_memory.py's CPU and GPU models (vocabulary
256, untied head), and a model whose tied 8192-row embedding outweighs its blocks ("vocab": the
group without weight decay the larger, as in a GPT-2 small's 38.6 M of 124 M)."""
VOCAB = {"vocab": 8192}
"""Vocabulary per shape where not 256; those models tie the head to the embedding."""
KiB = 2**10
MiB = 2**20


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """The most bytes `fn` holds at once beyond what was live when it started."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def build(shape: str, device: str, dtype: torch.dtype) -> nn.ModuleList:
    layers, d_model, heads, seq_len = SHAPES[shape]
    torch.manual_seed(0)
    specs = gpt_layers(VOCAB.get(shape, 256), d_model, heads, layers, seq_len, tie_embeddings=shape in VOCAB)
    # The whole model as train builds it: a tied embedding and head one module, its parameters once.
    return nn.ModuleList([build_reference(as_layers(specs), device)]).to(dtype)


def exact_step_bytes(optimizer: torch.optim.Optimizer, foreach: bool, masters: bool) -> int:
    groups = [[p.numel() for p in group["params"]] for group in optimizer.param_groups]
    if foreach:
        step = 4 * max(sum(group) for group in groups)
    else:
        step = 4 * max(max(2 * n + (group[i - 1] if i else 0) for i, n in enumerate(group))
                       for group in groups)
    copies = 4 * sum(sum(group) for group in groups) if masters else 0
    return copies + step


def row(shape: str, device: str, precision: str, foreach: bool) -> tuple[str, ...]:
    masters = precision == "bf16-pure"
    model = build(shape, device, torch.bfloat16 if masters else torch.float32)
    params = list(model.parameters())
    adamw = fp32_master_weights(torch.optim.AdamW) if masters else torch.optim.AdamW
    optimizer = adamw(parameter_groups(model, params, weight_decay=0.1), lr=1e-3, foreach=foreach)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()  # AdamW's state (and the masters) exist from here: the plan's optimizer term
    numels = [p.numel() for p in params]
    exempt = no_decay(model)
    fields = update_temporaries(numels, value_bytes=2 if masters else 4, foreach=foreach, masters=masters,
                                no_decay=[id(p) in exempt for p in params])
    parameter_bytes = sum(p.numel() * p.element_size() for p in params)
    free = sum(p.numel() * p.element_size() for p in params if id(p) in exempt)
    # The plan's step part: one rank holding the model, one layer carrying its bytes and split.
    layer = LayerCost(forward_s=0.0, backward_s=0.0, activation_bytes=0, output_bytes=0,
                      parameter_bytes=parameter_bytes, no_decay_parameter_bytes=free)
    planned = update_bytes(ModelCosts(layers=(layer,), **{**fields, "gradient_norm_bytes": 0}),
                           [parameter_bytes], [free])[0]
    # Before the groups: foreach's list on the whole rank, the model's two largest tensors.
    ungrouped = update_temporaries(numels, value_bytes=2 if masters else 4, foreach=foreach, masters=masters)
    before = round(parameter_bytes * (ungrouped["update_bytes_per_parameter_byte"]
                                      + ungrouped["update_group_bytes_per_parameter_byte"])
                   ) + ungrouped["update_tensor_bytes"]
    step = peak_bytes(optimizer.step, device)
    exact = exact_step_bytes(optimizer, foreach, masters)
    scope = GradientScope(params=tuple(params), not_counted=frozenset(), tp_group=None, tp_rank=0,
                          collectives=None, watchdog=None)  # type: ignore[arg-type]
    norm = peak_bytes(scope.total_norm, device)
    planned_norm = gradient_norm_bytes([p.numel() for p in params])
    update = max(planned_norm, planned)
    return (shape, precision, "foreach" if foreach else "single-tensor", f"{parameter_bytes / KiB:.0f}",
            f"{free / parameter_bytes:.0%}", f"{step / KiB:.1f}", f"{exact / KiB:.1f}",
            f"{planned / KiB:.1f}",
            f"{planned / step - 1:+.1%}", f"{before / KiB:.1f}", f"{before / step - 1:+.1%}",
            f"{norm / KiB:.1f}", f"{planned_norm / KiB:.1f}", f"{update / KiB:.1f}")


HEADER = ("model", "precision", "AdamW path", "parameters KiB", "no decay", "step measured KiB",
          "step exact KiB", "step plan KiB", "plan error", "before KiB", "before error", "norm measured KiB",
          "norm plan KiB", "update plan KiB")


def overflow_row(shape: str, device: str) -> tuple[str, ...]:
    """fp16's loss-scale work after the pipeline's call on the model's fp32 gradients: the
    overflow check (`overflowed`) and the unscale (`unscale_and_add_back`), beside the norm."""
    params = list(build(shape, device, torch.float32).parameters())
    for param in params:
        param.grad = torch.randn_like(param)
    scale = DynamicLossScale(2.0**16, growth_interval=100, group=None, watchdog=None)  # type: ignore[arg-type]
    check = peak_bytes(lambda: scale.overflowed(params, torch.device(device)), device)
    scale.set_aside(params)  # .grad is then the step's own contribution, unscaled in place
    for param in params:
        param.grad = torch.randn_like(param)
    unscale = peak_bytes(lambda: scale.unscale_and_add_back(params), device)
    numels = [p.numel() for p in params]
    formula = overflow_check_bytes(numels, 4)
    return (shape, f"{max(numels) / 1024:.0f}", f"{check / KiB:.1f}", f"{formula / KiB:.1f}",
            f"{unscale / KiB:.2f}", f"{gradient_norm_bytes(numels) / KiB:.1f}")


GPT2: dict[str, Any] = dict(num_layers=12, d_model=768, num_heads=12, seq_len=1024, vocab_size=50257)
"""GPT-2 small (tied head): its 38.6 M-element embedding is 31% of its weights, all without decay."""
GPT2_BOUNDS = (0, 5, 8, 11, 16)
"""Four stages of its 16 layers (embeddings, 12 blocks, norm, head): 3 blocks each, the embeddings
with the first, the norm and tied head with the last."""


def plan_rows() -> list[tuple[str, ...]]:
    """What `pipefold plan --hardware h100-80gb` prices per rank for GPT-2 small, 1F1B over four
    ranks at 4 micro-batches of one sample: the step's temporaries with the groups and as a cost
    file without them prices them (the whole rank's list), the gradient norm's per rank (its
    layers' largest) and as such a file prices it (the model's, on every rank), and the rank's
    update and total with all of that and as before (the same costs otherwise)."""
    from dataclasses import replace

    from pipefold.plan.estimate import GptEstimate
    from pipefold.plan.evaluate import evaluate
    from pipefold.plan.hardware import load_hardware
    from pipefold.plan.space import Config
    from pipefold.simulate import Link

    def memory(costs: ModelCosts) -> tuple[RankMemory, ...]:
        return evaluate(costs, Config("1f1b", 1, 4, 1), num_ranks=4, bounds=GPT2_BOUNDS, recompute=(),
                        link=Link()).memory

    def without_norm(costs: ModelCosts) -> ModelCosts:
        return replace(costs, gradient_norm_bytes=0,
                       layers=tuple(replace(layer, gradient_norm_bytes=0) for layer in costs.layers))

    found: list[tuple[str, ...]] = []
    for precision, dtype, parameter_bytes in (("fp32", "fp32", 0), ("bf16-pure", "bf16", 2)):
        costs = GptEstimate(hardware=load_hardware("h100-80gb"), dtype=dtype, parameter_bytes=parameter_bytes,
                            **GPT2).at(1, 1, Link(), False)
        old = replace(costs, layers=tuple(replace(layer, no_decay_parameter_bytes=0, gradient_norm_bytes=0)
                                          for layer in costs.layers),
                      update_bytes_per_parameter_byte=(costs.update_bytes_per_parameter_byte
                                                       + costs.update_group_bytes_per_parameter_byte),
                      update_group_bytes_per_parameter_byte=0.0)
        ranks, ranks_before = memory(costs), memory(old)
        step, step_before = memory(without_norm(costs)), memory(without_norm(old))
        norms = memory(replace(costs, update_bytes_per_parameter_byte=0.0,
                               update_group_bytes_per_parameter_byte=0.0, update_tensor_bytes=0))
        for rank, (held, before) in enumerate(zip(ranks, ranks_before, strict=True)):
            found.append((precision, str(rank), f"{held.weights / MiB:.0f}",
                          f"{step_before[rank].update / MiB:.0f}", f"{step[rank].update / MiB:.0f}",
                          f"{costs.gradient_norm_bytes / MiB:.0f}", f"{norms[rank].update / MiB:.0f}",
                          f"{before.update / MiB:.0f}", f"{held.update / MiB:.0f}",
                          f"{before.total / MiB:.0f}", f"{held.total / MiB:.0f}",
                          "update" if held.total == held.update_total else "pipeline"))
    return found


PLAN_HEADER = ("precision", "rank", "weights MiB", "step before MiB", "step MiB", "norm before MiB",
               "norm MiB", "update before MiB", "update MiB", "total before MiB", "total MiB", "peak in")


OVERFLOW_HEADER = ("model", "largest gradient K elements", "check measured KiB", "check formula KiB",
                   "unscale measured KiB", "norm plan KiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    default = args.device == "cuda"  # torch's default path: foreach on CUDA, single-tensor on CPU
    print(f"torch {torch.__version__} on {args.device}; default AdamW path: "
          f"{'foreach' if default else 'single-tensor'}")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for shape in args.shapes:
        for precision in ("fp32", "bf16-pure"):
            for foreach in (default, not default):
                print("| " + " | ".join(row(shape, args.device, precision, foreach)) + " |", flush=True)
    print()
    print("| " + " | ".join(OVERFLOW_HEADER) + " |")
    print("|" + "---|" * len(OVERFLOW_HEADER))
    for shape in args.shapes:
        print("| " + " | ".join(overflow_row(shape, args.device)) + " |", flush=True)
    print()
    print("| " + " | ".join(PLAN_HEADER) + " |")
    print("|" + "---|" * len(PLAN_HEADER))
    for entry in plan_rows():
        print("| " + " | ".join(entry) + " |")


if __name__ == "__main__":
    main()
