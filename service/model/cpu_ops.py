"""The decoder's optional C++ CPU kernels (`csrc/`): decode attention, RMSNorm, rotary and SwiGLU's product.

In a 16-sequence SmolLM2 decode step the base matmuls take ~18 ms of ~35; much of the rest was small torch
ops, each a few microseconds of dispatch and a pass over memory. These kernels do the same maths in one
call each, on the CPU, for the engine's step path:
- `decode_attention_`: each decoding sequence's new key/value written into its cache slot and its
  attention computed in place in fp32 (the torch path gathers every sequence's cache rows into a fresh
  tensor first): 146 -> ~25 us per layer.
- `rms_norm`, `rotary`, `silu_mul`: one pass instead of eight, ten and two ops, with the torch code's
  roundings (rotary bit-identical; RMSNorm's sum of squares and silu's exp may differ in the last fp32
  bit, so a bf16 output can rarely differ in its last bit).
Built together by `adapters_core.native.NativeKernel`; `ADAPTER_SERVE_CPU_KERNELS=0` or a failed build
leaves the torch path everywhere. Each `*_usable` says whether a call may use the kernel.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from adapters_core.native import NativeKernel

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_KERNEL = NativeKernel("adapter_serve_cpu_ops", [os.path.join(_CSRC, name) for name in (
    "bindings.cpp", "decode_attention.cpp", "decode_layers.cpp", "rms_norm.cpp", "rotary.cpp", "row_argmax.cpp", "silu_mul.cpp")],
    "ADAPTER_SERVE_CPU_KERNELS", extra_cflags=("-ffp-contract=off",))   # no FMA where torch rounds a product


def kernel() -> Optional[object]:
    """The compiled module (built once per process, from the cache when it exists), or None."""
    return _KERNEL.module()


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels apply: CPU tensors of one dtype, no gradient wanted, and the module built."""
    first = tensors[0]
    return (all(t.is_cpu and t.dtype == first.dtype for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and kernel() is not None)


def decode_attention_(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                      scale: float) -> None:
    """For each decoding sequence b: write k/v[tokens[b]] at positions[b] of cache slot slots[b], then
    out[tokens[b]] = attention of q[tokens[b]] over that slot's positions 0..positions[b]."""
    kernel().decode_attention_(out, q, k, v, k_cache, v_cache, tokens, slots, positions, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * T(x * rsqrt(mean(x^2) + eps)) over the last dimension, computed in fp32, T = x's dtype."""
    return kernel().rms_norm(x, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, H, D], k [N, Hkv, D] rotated by cos / sin [N, 1, D], as `rope.apply_rotary` rounds."""
    q_out, k_out = kernel().rotary(q, k, cos, sin)
    return q_out, k_out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for 2-D tensors with contiguous rows, as `F.silu(gate) * up` rounds."""
    return kernel().silu_mul(gate, up)


def finite_rows_and_argmax(logits: torch.Tensor) -> tuple[list[bool], list[int]]:
    """For logits [R, V]: whether each row is all finite, and each row's argmax (first maximal index, as
    torch.argmax; meaningful for finite rows). One kernel pass on the CPU, torch ops elsewhere."""
    if logits.is_cpu and logits.dim() == 2 and logits.stride(-1) == 1 and kernel() is not None:
        index, finite = kernel().row_argmax(logits)
        return finite.tolist(), index.tolist()
    return torch.isfinite(logits).all(dim=-1).tolist(), logits.float().argmax(dim=-1).tolist()
