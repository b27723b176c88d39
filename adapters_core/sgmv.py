"""The optional fused CPU kernel for mixed batches (`csrc/sgmv.cpp`), built on first use.

`stacked_forward` (and `grouped_forward`, for layers sharing an input) replaces gathered copies + two
`bmm`s with one call that reads each token's adapter factors in place and accumulates in fp32, for decode
steps and prefill chunks alike. A layer's adapters reach the kernel through its slot *table* (`table_row`
per slot: the addresses of A [r, in], Bt [r, out] and the per-rank fp32 scale, the rank, the dtype code and
the sizes), so adapters of any rank and of fp32 / bf16 / fp16 sit side by side without padding. Measured on
the development CPU for SmolLM2's 210 adapted layers and 16 distinct rank-16 adapters (padded stacks then):
6.4 ms per decode step against 12.5 ms for the fp32 `bmm`s on gathered copies; the step streams the adapters'
rows at about the memory's pace. Compiled by `native.NativeKernel` (needs a C++ compiler with OpenMP and the
`ninja` package); where that fails, or with `ADAPTERS_CORE_SGMV=0`, the torch path runs instead, with the
same results to rounding. An optional fp32 scale per token multiplies the shrink's output (a request's
`adapter_scale`)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from .native import NativeKernel

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "sgmv.cpp")
_KERNEL = NativeKernel("adapters_core_sgmv", _SOURCE, "ADAPTERS_CORE_SGMV")       # the one serving uses
_KERNELS = {"native": _KERNEL}


def native_kernel(arch: str = "native") -> NativeKernel:
    """The kernel's builder for gcc's -march=`arch` ("native" is the one serving uses)."""
    if arch not in _KERNELS:
        _KERNELS[arch] = NativeKernel("adapters_core_sgmv", _SOURCE, "ADAPTERS_CORE_SGMV", arch=arch)
    return _KERNELS[arch]


def kernel(arch: str = "native") -> Optional[object]:
    """The compiled module for gcc's -march=`arch` (built once per process, from the cache when it exists),
    or None. Other levels than native ("x86-64-v3": AVX2, "x86-64": the portable loops) are for tests."""
    return native_kernel(arch).module()


TABLE_COLUMNS = 7
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # csrc/lora_table.h's Dtype


def table_row(a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, checked: bool = False
              ) -> Optional[list[int]]:
    """One slot's row of a layer table: A [r, in] and Bt [r, out] contiguous in one of fp32 / bf16 / fp16,
    scale [r] contiguous fp32. The caller keeps the three tensors alive as long as the row is in use. None
    for factors the kernel does not read (another dtype, another device): such a slot takes the torch path.
    `checked`: the caller made the three so on the CPU (`stack.plain_factors`' A and Bt of one dtype,
    `stack.lora_scale_rows`' scale), and only the dtype is looked at (a loader makes 60 rows an adapter)."""
    code = DTYPE_CODES.get(a.dtype)
    if checked:
        return None if code is None else [a.data_ptr(), bt.data_ptr(), scale.data_ptr(), a.shape[0], code,
                                          a.shape[1], bt.shape[1]]
    if code is None or bt.dtype != a.dtype or not (a.is_cpu and bt.is_cpu and scale.is_cpu):
        return None
    if not (a.is_contiguous() and bt.is_contiguous() and scale.is_contiguous() and scale.dtype == torch.float32):
        raise ValueError("table rows need contiguous factors and an fp32 scale")
    r = a.shape[0]
    if bt.shape[0] != r or scale.numel() != r:
        raise ValueError(f"factors of rank {r} with Bt {tuple(bt.shape)} and {scale.numel()} scales")
    return [a.data_ptr(), bt.data_ptr(), scale.data_ptr(), r, code, a.shape[1], bt.shape[1]]


def lora_add_group_(results: list[torch.Tensor], x: torch.Tensor, tables: list[torch.Tensor],
                    slots: torch.Tensor, scales: Optional[torch.Tensor] = None) -> None:
    """results[k][t] += ((A x[t]) * rank_scale * scales[t]) @ Bt for the factors of tables[k][slots[t]], in
    place with fp32 accumulation: x [T, in] and results [T, out_k] with contiguous rows, tables [n, 7] int64
    (rank 0 rows: nothing added), slots [T] int64, scales [T] fp32 or None."""
    kernel().lora_add_group_(results, x, tables, slots, scales)


_TRANSPOSABLE = (torch.float32, torch.bfloat16, torch.float16)


def transpose_copy_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst [C, R] = src [R, C].T (converted to dst's dtype as `copy_` converts), for contiguous CPU tensors:
    the kernel's tiled transpose where it is built and both are fp32 / bf16 / fp16, else `copy_`."""
    k = kernel()
    if (k is not None and src.dtype in _TRANSPOSABLE and dst.dtype in _TRANSPOSABLE and src.dim() == 2
            and src.is_cpu and dst.is_cpu and src.is_contiguous() and dst.is_contiguous()):
        k.transpose_copy_(dst, src)
    else:
        dst.copy_(src.T)
