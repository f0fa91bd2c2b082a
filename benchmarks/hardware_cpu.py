"""Measure this machine for a `cpu` hardware file: matrix-product speed by size, memory bandwidth,
and what one rank sends another through pipefold's shared-memory transport path (a tensor copy).

    python benchmarks/hardware_cpu.py            # prints the TOML tables to paste into a file

One thread, as each rank of `pipefold train` runs on CPU. Each figure is the best of a few
repeats (the least disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import os
import time

import torch


def best(fn: object, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    points = []
    for n in (32, 64, 128, 256, 512, 1024):
        a, b = torch.randn(n, n), torch.randn(n, n)
        calls = max(1, int(2e8 / (2 * n**3)))
        seconds = best(lambda a=a, b=b, calls=calls: [a @ b for _ in range(calls)]) / calls
        points.append((2 * n**3, 2 * n**3 / seconds))
    peak = max(rate for _, rate in points)
    src = torch.empty(64 * 2**20 // 4)
    dst = torch.empty_like(src)
    copy_s = best(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 4 / copy_s  # read + write
    small = torch.empty(16)
    small_dst = torch.empty_like(small)
    latency = best(lambda: [small_dst.copy_(small) for _ in range(1000)]) / 1000
    print(f"# measured by benchmarks/hardware_cpu.py, {os.cpu_count()} cores, 1 thread")
    print(f"[compute.peak_flops]\nfp32 = {peak:.3g}")
    print("[compute.matmul]\ntable = [" + ", ".join(f"[{f:.3g}, {r / peak:.3f}]" for f, r in points) + "]")
    print(f"memory_bandwidth = {bandwidth:.3g}  # copy of 64 MiB, read + write bytes")
    print(f"# tensor copy latency {latency:.3g} s")


if __name__ == "__main__":
    main()
