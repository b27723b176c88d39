"""Which dtype the base model runs in by default: bfloat16 where the hardware computes it fast (a CUDA
GPU with bf16 support; a CPU with AVX512-BF16 or AMX), float32 elsewhere. Settings can override it."""

from __future__ import annotations

import functools

import torch

from adapters_core.cpu_flags import cpu_flags

_FAST_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """The CPU computes bf16 fast, as this process may use it (`adapters_core.cpu_flags`: under an
    `ADAPTERS_CORE_KERNEL_ARCH` level such as x86-64-v3, an AVX-512 CPU counts as the AVX2 one it stands for)."""
    return any(flag in cpu_flags() for flag in _FAST_BF16_CPU_FLAGS)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def parse_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """"auto" | "float32" | "bfloat16" | "float16" -> a torch dtype."""
    if name == "auto":
        return default_dtype(device)
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise ValueError(f"dtype must be one of auto, {', '.join(choices)}; got {name!r}")
    return choices[name]
