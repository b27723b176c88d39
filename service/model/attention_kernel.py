"""The optional C++ decode attention (`csrc/decode_attention.cpp`) used by `Attention.forward_step` on the CPU.

In a decode step every sequence brings one query token. The torch path writes the new keys and values
into the cache, gathers each sequence's cache rows into a fresh tensor, casts them to fp32 and runs two
batched matmuls and a softmax: ~15 small ops per layer, 146 us per layer for SmolLM2 at 16 sequences of
~60 tokens on the development CPU (4.4 ms of a ~38 ms step). The kernel does the same maths in fp32 in one
call, reading the cache in place. Built by `adapters_core.native.NativeKernel`; `ADAPTER_SERVE_ATTENTION_KERNEL=0`
or a failed build leaves the torch path, which gives the same results to rounding.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from adapters_core.native import NativeKernel

_KERNEL = NativeKernel("adapter_serve_decode_attention",
                       os.path.join(os.path.dirname(__file__), "csrc", "decode_attention.cpp"),
                       "ADAPTER_SERVE_ATTENTION_KERNEL")


def kernel() -> Optional[object]:
    """The compiled module (built once per process, from the cache when it exists), or None."""
    return _KERNEL.module()


def usable(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The kernel applies: CPU tensors of one dtype, no gradient wanted, and the kernel built."""
    return (q.is_cpu and k_cache.is_cpu and q.dtype == k_cache.dtype
            and not (torch.is_grad_enabled() and q.requires_grad) and kernel() is not None)


def decode_attention_(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                      scale: float) -> None:
    """For each decoding sequence b: write k/v[tokens[b]] at positions[b] of cache slot slots[b], then
    out[tokens[b]] = attention of q[tokens[b]] over that slot's positions 0..positions[b]."""
    kernel().decode_attention_(out, q, k, v, k_cache, v_cache, tokens, slots, positions, scale)
