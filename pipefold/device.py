"""Which device a rank computes on: one resolver for the job, the CLI and the tools.

    from pipefold.device import DEVICE_CHOICES, resolve_device
    device = resolve_device("auto", local_rank=0)     # cuda:0 where this machine has a GPU per rank

Torch-free to import (the configuration checks `DEVICE_CHOICES` without torch); torch is
imported when a device is resolved. `check_compiler("compile")` refuses `torch.compile` where
inductor would find no C++ compiler, before any rank starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import TYPE_CHECKING

from pipefold.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["DEVICE_CHOICES", "check_compiler", "cpp_compiler", "has_cuda", "native_bf16", "resolve_device"]

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
"""What a configuration may ask for: "auto" (a GPU per local rank where there are enough, else
the CPU), "cpu" or "cuda"."""


def resolve_device(choice: str = "auto", local_rank: int | None = None) -> torch.device:
    """This rank's device for `choice` (one of DEVICE_CHOICES); `local_rank` defaults to $LOCAL_RANK.

    "auto" takes cuda:<local rank> when this machine has a GPU for every local rank
    ($LOCAL_WORLD_SIZE, else local_rank + 1), else the CPU (with a warning when some GPUs
    exist but too few). "cuda" refuses a local rank without a GPU (ConfigError).
    """
    import torch  # deferred: this module is imported by the torch-free configuration

    if choice not in DEVICE_CHOICES:
        raise ConfigError(f"device={choice!r} is not allowed: use one of {', '.join(DEVICE_CHOICES)}")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if local_rank >= num_gpus:
            raise ConfigError(
                f'device="cuda" but local rank {local_rank} has no GPU (this machine has {num_gpus}); '
                f'use at most {num_gpus} ranks per machine or device="cpu"'
            )
        return torch.device("cuda", local_rank)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    if num_gpus and local_world <= num_gpus:
        return torch.device("cuda", local_rank)
    if num_gpus:
        logger.warning("%d local ranks but %d GPUs: running on the CPU", local_world, num_gpus)
    return torch.device("cpu")


def native_bf16(device_type: str) -> bool:
    """Whether a `device_type` ("cpu" or "cuda") device multiplies bf16 matrices in hardware.

    CUDA: a GPU torch reports native bf16 for (Ampere and later). CPU: AMX-BF16 or
    AVX512-BF16, from /proc/cpuinfo's flags without importing torch (a configuration resolves
    its precision before any rank starts), else torch.cpu's probes; other CPUs emulate bf16
    products through fp32 and gain nothing from them.
    """
    if device_type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as info:
                flags = {word for line in info if line.startswith("flags") for word in line.split()}
            return bool(flags & {"amx_bf16", "avx512_bf16"})
        except OSError:
            pass
    import torch  # deferred: this module is imported by the torch-free configuration

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device_type != "cpu":
        return False
    names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    probes = [getattr(torch.cpu, name, None) for name in names]
    return any(bool(probe()) for probe in probes if callable(probe))


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU (imports torch)."""
    import torch

    return bool(torch.cuda.is_available())


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's inductor backend would use, or None where it finds none.

    Inductor (torch/_inductor/config.py, `cpp.cxx`) runs $CXX, else g++ (clang++ on macOS),
    to build the kernels it generates for the CPU (and Triton needs a C compiler to build its
    GPU launchers); this looks the same name up on the PATH without importing torch.
    """
    name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
    return shutil.which(name)


def check_compiler(field: str) -> None:
    """Refuse `field` (a compile option, as its user spells it) where there is no C++ compiler."""
    if cpp_compiler() is None:
        name = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        raise ConfigError(
            f"{field}=True is not allowed: torch.compile's inductor builds its kernels with a C++ "
            f"compiler and {name!r} is not on the PATH; install one (apt-get install g++, or "
            "conda install gxx), point $CXX at it, or drop the compile option"
        )
