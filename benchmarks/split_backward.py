"""Time the full backward (B) against the split one (I + W) on one transformer block.

The zero-bubble schedules assume I + W costs about B; pipefold's split keeps the
gradients at the frontier nodes during I so that W does not run the input path again.
This script checks that on a pre-LN transformer block (d=256, 4 heads, seq 128, batch 4,
fp32, one CPU thread by default) and prints the medians and the ratio (I + W) / B,
which should stay within 1.15.

Run:
    .venv/bin/python benchmarks/split_backward.py
    .venv/bin/python benchmarks/split_backward.py --repeats 50 --checkpoint   # with activation checkpointing
    .venv/bin/python benchmarks/split_backward.py --device cuda --threads 0
    .venv/bin/python benchmarks/split_backward.py --autograd-w   # W through autograd for every group
    .venv/bin/python benchmarks/split_backward.py --block mlp --batch 32   # 4 residual MLP blocks, d=512

Each repeat runs one fresh forward before each measured backward (the forward is not
timed), and B and I + W alternate so that machine noise hits both alike.

On CPU part of the gap is the allocator, not autograd: I keeps the gradients at the
frontier nodes until W, so the split needs a few MB more than B at its peak; glibc hands
freed memory back to the kernel between repeats and the next I page-faults it in again
(the script prints minor page faults per phase). A caching allocator (CUDA's, or glibc
told to keep its heap) removes that part:
    MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_MMAP_THRESHOLD_=4000000000 \
        .venv/bin/python benchmarks/split_backward.py
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipefold.model.zoo import ResidualMLP
from pipefold.runtime.backward import GroupCache, backward_full, backward_input, backward_weight
from pipefold.runtime.processes.allocator import keep_freed_memory


class PreLNBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, use_checkpoint: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.use_checkpoint = use_checkpoint

    def _attention(self, x: Tensor) -> Tensor:
        h = self.ln1(x)
        attended: Tensor = self.attn(h, h, h, need_weights=False)[0]
        return x + attended

    def forward(self, x: Tensor) -> Tensor:
        if self.use_checkpoint:
            x = checkpoint(self._attention, x, use_reentrant=False)
        else:
            x = self._attention(x)
        mixed: Tensor = self.mlp(self.ln2(x))
        return x + mixed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 leaves torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint", action="store_true", help="checkpoint the attention half")
    parser.add_argument(
        "--autograd-w",
        action="store_true",
        help="W through autograd for every parameter group, not the direct linear/layer-norm "
        "path (docs/decisions.md, 'direct weight gradients')",
    )
    parser.add_argument(
        "--block",
        choices=("transformer", "mlp"),
        default="transformer",
        help="transformer: one pre-LN block on (batch, seq, d); mlp: the benchmark's 4 residual "
        "MLP blocks (half the mlp workload, one stage at 2 ranks) on (batch, d)",
    )
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's allocator thresholds alone (Pipeline raises them on CPU; processes/allocator.py)",
    )
    args = parser.parse_args()
    if not args.glibc_default and args.device == "cpu":
        keep_freed_memory()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    block: nn.Module
    if args.block == "mlp":
        block = nn.Sequential(*[ResidualMLP(args.d_model) for _ in range(4)]).to(device)
        x = torch.randn(args.batch, args.d_model, device=device)
    else:
        block = PreLNBlock(args.d_model, args.num_heads, args.checkpoint).to(device)
        x = torch.randn(args.batch, args.seq, args.d_model, device=device)
    # As the executor calls it: the stage's parameter tuple and one group cache per stage.
    params = tuple(block.parameters())
    cache = GroupCache()
    grad = torch.randn_like(x)

    def fresh_forward() -> tuple[Tensor, Tensor]:
        leaf = x.detach().requires_grad_()
        return leaf, block(leaf)

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def time_full() -> tuple[float, int]:
        leaf, out = fresh_forward()
        _sync(device)
        start, start_faults = time.perf_counter(), faults()
        backward_full((out,), (grad,), (leaf,))
        _sync(device)
        return time.perf_counter() - start, faults() - start_faults

    def time_split() -> tuple[float, float, int]:
        leaf, out = fresh_forward()
        _sync(device)
        start, start_faults = time.perf_counter(), faults()
        _, state = backward_input(
            (out,), (grad,), (leaf,), params, direct=not args.autograd_w, cache=cache
        )
        _sync(device)
        middle = time.perf_counter()
        del out  # an executor drops the outputs once I has sent the input gradient
        backward_weight(state)
        _sync(device)
        return middle - start, time.perf_counter() - middle, faults() - start_faults

    b_times: list[float] = []
    i_times: list[float] = []
    w_times: list[float] = []
    b_faults: list[int] = []
    split_faults: list[int] = []
    for repeat in range(args.warmup + args.repeats):
        b, b_fault = time_full()
        block.zero_grad(set_to_none=True)
        i, w, split_fault = time_split()
        block.zero_grad(set_to_none=True)
        if repeat >= args.warmup:
            b_times.append(b)
            i_times.append(i)
            w_times.append(w)
            b_faults.append(b_fault)
            split_faults.append(split_fault)

    def ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values)

    ratio = statistics.median([(i + w) / b for i, w, b in zip(i_times, w_times, b_times, strict=True)])
    print(
        f"block={args.block} d={args.d_model} heads={args.num_heads} seq={args.seq} batch={args.batch} "
        f"device={device} threads={torch.get_num_threads()} checkpoint={args.checkpoint} "
        f"W={'autograd' if args.autograd_w else 'direct where possible'} repeats={args.repeats}"
    )
    print(f"B      {ms(b_times):8.2f} ms")
    print(f"I      {ms(i_times):8.2f} ms")
    print(f"W      {ms(w_times):8.2f} ms")
    print(f"I + W  {ms([i + w for i, w in zip(i_times, w_times, strict=True)]):8.2f} ms")
    print(
        f"minor page faults per repeat (median): B {statistics.median(b_faults):.0f}, "
        f"I + W {statistics.median(split_faults):.0f}"
    )
    print(f"(I + W) / B = {ratio:.3f}  (median of per-repeat ratios; target <= 1.15)")


if __name__ == "__main__":
    main()
