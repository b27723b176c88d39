"""The optional fused CPU kernel for mixed batches (`csrc/sgmv.cpp`), built on first use.

`stacked_forward` (and `grouped_forward`, for layers sharing an input) replaces its gather + two `bmm`s
with one call that reads each token's adapter rows straight from the stacks and accumulates in fp32, for
decode steps and prefill chunks alike. Measured on the development CPU for SmolLM2's 210 adapted layers
and 16 distinct rank-16 adapters: 6.4 ms per decode step against 12.5 ms for the fp32 `bmm`s on gathered
copies (bf16 stacks); the AVX-512 version (built where the compiler targets it) 6.2 ms against 8.5 ms for
the portable loops on an AMD EPYC (Zen 4), and 2.3 ms against 7.7 ms when the adapters' rows are
cache-hot. A decode step streams 156 MB of adapter rows; merely reading them in the same pattern takes
5.9 ms there, so the kernel runs at the memory's pace. Compiled by `native.NativeKernel` (needs a C++
compiler with OpenMP and the `ninja` package); where that fails, or with `ADAPTERS_CORE_SGMV=0`, the torch
path runs instead, with the same results to rounding. An optional fp32 scale per token multiplies the
shrink's output (a request's `adapter_scale`); without one the kernel does exactly what it did before."""

from __future__ import annotations

import os
from typing import Optional

import torch

from .native import NativeKernel

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "sgmv.cpp")
_KERNEL = NativeKernel("adapters_core_sgmv", _SOURCE, "ADAPTERS_CORE_SGMV")       # the one serving uses
_KERNELS = {"native": _KERNEL}


def kernel(arch: str = "native") -> Optional[object]:
    """The compiled module for gcc's -march=`arch` (built once per process, from the cache when it exists),
    or None. Other levels than native ("x86-64-v3": AVX2, "x86-64": the portable loops) are for tests."""
    if arch not in _KERNELS:
        _KERNELS[arch] = NativeKernel("adapters_core_sgmv", _SOURCE, "ADAPTERS_CORE_SGMV", arch=arch)
    return _KERNELS[arch].module()


def sgmv_add_(result: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              slots: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """result[g] += ((x[g] @ A[slots[g]]) * scales[g]) @ B[slots[g]] in place (fp32 accumulation): result
    [G, out] and x [G, in] with contiguous rows, stacks A [n, in, R] / B [n, R, out], slots [G] int64,
    scales [G] fp32 or None (no multiply at all: the unscaled kernel, bit for bit)."""
    kernel().sgmv_add_(result, x, a_stack, b_stack, slots, scales)
    return result
