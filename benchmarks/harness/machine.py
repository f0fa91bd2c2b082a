"""A short description of the machine, for the report header. No torch import at module level."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

__all__ = ["describe_machine"]


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        output = ""
    for line in output.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


def describe_machine() -> dict[str, Any]:
    import torch  # here: the parent describes the machine after the runs, when torch is loaded

    try:
        import deepspeed  # type: ignore[import-not-found]

        deepspeed_version: str | None = str(deepspeed.__version__)
    except ImportError:
        deepspeed_version = None
    return {
        "cpu": _cpu_model(),
        "num_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed_version,
    }
