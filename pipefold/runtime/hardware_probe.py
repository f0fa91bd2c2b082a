"""Time what a hardware file gives, on this machine's device: matrix products of a transformer
layer's shapes, a large tensor copy, and the path a tensor takes between two ranks.

    from pipefold.runtime.hardware_probe import Timer, layer_shapes, time_matmuls, copy_bandwidth
    timer = Timer("cuda")
    samples = time_matmuls(timer, "bf16", layer_shapes(max_bytes=8 * 2**30, value_bytes=2),
                           budget_s=10, repeats=5)

`pipefold profile --hardware FILE` (pipefold/cli/profile_hardware.py) runs these and writes the
file (`pipefold.plan.hardware_file`). Each figure is the best of `repeats` samples, a sample
being enough back-to-back calls to last `min_sample_s` (the least disturbed by other processes;
on a GPU the calls queue as a model's kernels do). Every sample follows a warm-up call (cuBLAS
picks its kernel and allocates its workspace on the first call of a shape), and on CUDA is timed
with CUDA events around the calls, read after the end event has completed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pipefold.errors import ConfigError
from pipefold.plan.hardware_file import DTYPE_NAMES, MatmulSample

__all__ = [
    "DTYPES", "Shape", "Timer", "copy_bandwidth", "layer_shapes", "peer_copy", "shared_memory_copy",
    "time_matmuls",
]

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(DTYPES) == DTYPE_NAMES
"""The dtypes a hardware file prices (`[compute.peak_flops]`'s keys) and their torch dtype; tf32
is fp32 tensors with CUDA's TF32 tensor-core products allowed, fp32 with them forbidden."""

HEAD_DIM = 64
"""Dimensions per attention head in the core's products (GPT-2/3's and Megatron's)."""

MAX_SEQ_LEN = 2048
"""Tokens per sequence of the attention core at most (GPT-3's and Megatron's context)."""


@dataclass(frozen=True)
class Shape:
    """A product to time: `batch` x (m x k) @ (k x n)."""

    name: str
    m: int
    k: int
    n: int
    batch: int = 1
    transposed: bool = True
    """The right operand is a transposed view (a linear layer's weight, the core's keys), as the
    model passes it to the product."""

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.k * self.n

    def num_bytes(self, value_bytes: int) -> int:
        """Both operands and the result."""
        return self.batch * (self.m * self.k + self.k * self.n + self.m * self.n) * value_bytes


def layer_shapes(max_bytes: int, value_bytes: int, *, min_width: int = 32, max_width: int = 32768,
                 token_ratios: Sequence[int] = (1, 4, 16)) -> list[Shape]:
    """The products of a decoder layer of width h = min_width, 2 min_width, ... max_width over M = h
    x ratio tokens (rows x sequence length), FLOPs ascending; those whose operands and result
    exceed `max_bytes` are left out. Per (h, M): qkv (M x h x 3h), proj (M x h x h), mlp_up
    (M x h x 4h), mlp_down (M x 4h x h), and the attention core's scores and context, batched over
    rows x heads (heads of `HEAD_DIM`, sequences of up to `MAX_SEQ_LEN` tokens)."""
    shapes = []
    width = min_width
    while width <= max_width:
        for ratio in token_ratios:
            tokens = width * ratio
            head_dim = min(HEAD_DIM, width)
            seq_len = min(tokens, MAX_SEQ_LEN)
            batch = tokens // seq_len * (width // head_dim)
            shapes += [
                Shape("qkv", tokens, width, 3 * width),
                Shape("proj", tokens, width, width),
                Shape("mlp_up", tokens, width, 4 * width),
                Shape("mlp_down", tokens, 4 * width, width),
                Shape("scores", seq_len, head_dim, seq_len, batch),
                Shape("context", seq_len, seq_len, head_dim, batch, transposed=False),
            ]
        width *= 2
    fitting = [shape for shape in shapes if shape.num_bytes(value_bytes) <= max_bytes]
    return sorted(fitting, key=lambda shape: (shape.flops, shape.name))


class Timer:
    """Seconds of `calls` back-to-back calls on a device: CUDA events on the current stream
    (`devices`: also wait for these devices before and after, for copies between GPUs), or the
    wall clock on CPU."""

    def __init__(self, device: str, devices: Sequence[int] = ()) -> None:
        self.device = device
        self.devices = tuple(devices)

    def sync(self) -> None:
        if self.device == "cuda":
            for index in self.devices or (torch.cuda.current_device(),):
                torch.cuda.synchronize(index)

    def seconds(self, fn: Callable[[], object], calls: int) -> float:
        if self.device == "cuda" and not self.devices:
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / 1e3
        self.sync()
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return time.perf_counter() - started

    def per_call(self, fn: Callable[[], object], repeats: int, min_sample_s: float) -> float:
        """The best of `repeats` samples, after a warm-up call; a sample runs `fn` enough times to
        last `min_sample_s` (judged by one timed call)."""
        fn()
        self.sync()
        once = self.seconds(fn, 1)
        calls = max(1, min(100_000, math.ceil(min_sample_s / max(once, 1e-9))))
        return min(self.seconds(fn, calls) / calls for _ in range(repeats))


@contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """CUDA's TF32 products allowed or not, as before afterwards."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _product(shape: Shape, device: str, dtype: torch.dtype) -> Callable[[], object]:
    """A call computing `shape` as the model's layers do: a transposed weight or key view on the
    right, and a new result each call (its allocation, cheap from torch's caches, is part of
    what a layer pays per product)."""
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(shape.batch, shape.m, shape.k, device=device, dtype=dtype, generator=generator)
    if shape.transposed:
        right = torch.randn(shape.batch, shape.n, shape.k, device=device, dtype=dtype,
                            generator=generator).transpose(1, 2)
    else:
        right = torch.randn(shape.batch, shape.k, shape.n, device=device, dtype=dtype, generator=generator)
    if shape.batch == 1:
        left2, right2 = left[0], right[0]
        return lambda: torch.matmul(left2, right2)
    return lambda: torch.matmul(left, right)


def time_matmuls(timer: Timer, dtype: str, shapes: Sequence[Shape], *, budget_s: float, repeats: int,
                 min_sample_s: float = 2e-3) -> list[MatmulSample]:
    """Each of `shapes` (FLOPs ascending) in `dtype`, until the next would not finish within
    `budget_s`; at least the first `MIN_PRODUCTS`. The guess: its operands made at the last
    shape's seconds per byte, its calls at the median speed of the last `_GUESS_FROM` products
    (speed grows with size, so the guess errs long, and one slow shape does not stop the climb)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtypes: {dtype!r} is not a dtype pipefold prices; give some of "
                          f"{', '.join(DTYPES)}")
    started = time.perf_counter()
    samples: list[MatmulSample] = []
    value_bytes = DTYPES[dtype].itemsize
    setup_s_per_byte = 0.0
    with _tf32(dtype == "tf32"):
        for shape in shapes:
            if len(samples) >= MIN_PRODUCTS:
                rate = statistics.median(sample.rate for sample in samples[-_GUESS_FROM:])
                guess = shape.flops / rate
                setup = setup_s_per_byte * shape.num_bytes(value_bytes)
                cost = setup + 2 * guess + repeats * max(guess, min_sample_s)
                if time.perf_counter() - started + cost > budget_s:
                    break
            setup_started = time.perf_counter()
            call = _product(shape, timer.device, DTYPES[dtype])
            timer.sync()
            setup_s_per_byte = (time.perf_counter() - setup_started) / shape.num_bytes(value_bytes)
            seconds = timer.per_call(call, repeats, min_sample_s)
            samples.append(MatmulSample(shape.name, shape.m, shape.k, shape.n, seconds, shape.batch))
            del call
    return samples


MIN_PRODUCTS = 12
"""Products timed whatever the budget: a curve needs points, and the dozen smallest (widths 32
and 64) take well under a second together."""

_GUESS_FROM = 6
"""Products whose median speed guesses the next one's time: one width and token count's six."""


def copy_bandwidth(timer: Timer, num_bytes: int, repeats: int) -> tuple[float, float]:
    """Bytes/s of a copy of `num_bytes` within the device, counting read and write (2 x
    num_bytes); and the seconds of the copy."""
    source = torch.ones(num_bytes // 4, device=timer.device)
    target = torch.zeros_like(source)  # written once, so its pages exist before the timing
    seconds = timer.per_call(lambda: target.copy_(source), repeats, min_sample_s=2e-3)
    return 2 * num_bytes / seconds, seconds


def shared_memory_copy(num_bytes: int, repeats: int) -> tuple[float, float]:
    """What one rank's tensor costs to reach another on one host, as pipefold's shared-memory
    channel moves it: the sender's copy into the shared buffer and the receiver's copy out
    (pipefold.runtime.transport.shm). The bytes/s of `num_bytes` through both copies, and the
    seconds of both copies of a 64-byte tensor (without the channel's handshake)."""
    timer = Timer("cpu")

    def through(size: int) -> Callable[[], object]:
        source, shared, target = torch.ones(size // 4), torch.zeros(size // 4), torch.zeros(size // 4)
        return lambda: (shared.copy_(source), target.copy_(shared))

    seconds = timer.per_call(through(num_bytes), repeats, min_sample_s=2e-3)
    small = timer.per_call(through(64), repeats, min_sample_s=2e-3)
    return num_bytes / seconds, small


def peer_copy(num_bytes: int, repeats: int, source: int = 0, target: int = 1) -> tuple[float, float]:
    """Bytes/s of a copy of `num_bytes` from GPU `source` to GPU `target` (one direction), and
    the seconds of a 64-byte one, both devices synchronized around each sample."""
    timer = Timer("cuda", devices=(source, target))

    def copy(size: int) -> Callable[[], object]:
        sent = torch.ones(size // 4, device=f"cuda:{source}")
        received = torch.zeros(size // 4, device=f"cuda:{target}")
        return lambda: received.copy_(sent, non_blocking=True)

    seconds = timer.per_call(copy(num_bytes), repeats, min_sample_s=2e-3)
    # A latency is one copy alone, waited for: no other copies queued behind it.
    small_copy = copy(64)
    small_copy()
    small = min(timer.seconds(small_copy, 1) for _ in range(repeats))
    return num_bytes / seconds, small
