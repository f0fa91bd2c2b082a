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
temporaries beside the previous one's, in its group's order) and what the plan prices (`plan`:
the whole rank's list, the model's two largest tensors). Allocation sizes are deterministic; a
benchmark for its table (the same check on a small model is tests/runtime/test_update_temporaries.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from pipefold.job.optim import parameter_groups
from pipefold.model.zoo import gpt_layers
from pipefold.plan.update_memory import gradient_norm_bytes, update_temporaries
from pipefold.runtime.clip import GradientScope
from pipefold.runtime.master import fp32_master_weights

SHAPES = {"tiny": (2, 64, 4, 32), "gpu": (4, 1024, 16, 128)}
"""(layers, d_model, heads, seq_len) of benchmarks/planner_memory.py's CPU and GPU models."""
KiB = 2**10


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
    specs = gpt_layers(256, d_model, heads, layers, seq_len, tie_embeddings=False)
    return nn.ModuleList(spec.build(device) for spec in specs).to(dtype)


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
    fields = update_temporaries([p.numel() for p in params], value_bytes=2 if masters else 4,
                                foreach=foreach, masters=masters)
    parameter_bytes = sum(p.numel() * p.element_size() for p in params)
    per_byte, tensor = fields["update_bytes_per_parameter_byte"], fields["update_tensor_bytes"]
    planned = round(parameter_bytes * per_byte) + tensor
    step = peak_bytes(optimizer.step, device)
    exact = exact_step_bytes(optimizer, foreach, masters)
    scope = GradientScope(params=tuple(params), not_counted=frozenset(), tp_group=None, tp_rank=0,
                          collectives=None, watchdog=None)  # type: ignore[arg-type]
    norm = peak_bytes(scope.total_norm, device)
    planned_norm = gradient_norm_bytes([p.numel() for p in params])
    update = max(planned_norm, planned)
    return (shape, precision, "foreach" if foreach else "single-tensor", f"{parameter_bytes / KiB:.0f}",
            f"{step / KiB:.1f}", f"{exact / KiB:.1f}", f"{planned / KiB:.1f}", f"{planned / step - 1:+.1%}",
            f"{norm / KiB:.1f}", f"{planned_norm / KiB:.1f}", f"{update / KiB:.1f}")


HEADER = ("model", "precision", "AdamW path", "parameters KiB", "step measured KiB", "step exact KiB",
          "step plan KiB", "plan error", "norm measured KiB", "norm plan KiB", "update plan KiB")


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


if __name__ == "__main__":
    main()
