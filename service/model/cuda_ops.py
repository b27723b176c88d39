"""The decoder's optional Triton kernels for CUDA (`triton_attention.py`), and when a call may use them.

The CUDA counterpart of `cpu_ops.py`, which holds the C++ kernels that only ever see CPU tensors (each of its
gates checks `is_cpu` first). Here: `decode_attention_`, the decode step's attention reading the KV cache in
place. Prompt chunks take `F.scaled_dot_product_attention` on every device (flash attention on a GPU).
`ADAPTER_SERVE_TRITON`: `auto` (default) uses the kernels for CUDA tensors when Triton imports, `0` never
(the torch path: gathered cache rows and `decoder.decode_attention`), `1` also for CPU tensors when
`TRITON_INTERPRET=1` is set (Triton's interpreter: tests and `bench/gpu_check.py --dry-run`).
"""

from __future__ import annotations

import torch

from adapters_core.cuda_lora import TritonKernels, on_device

_KERNELS = TritonKernels("service.model.triton_attention", "ADAPTER_SERVE_TRITON")
kernels = _KERNELS.module          # `triton_attention`, or None


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels apply: tensors of one device with contiguous last dimensions, no gradient wanted, on CUDA
    (or on the CPU under Triton's interpreter when `ADAPTER_SERVE_TRITON=1`), and Triton importable."""
    first = tensors[0]
    if any(t.device != first.device or t.stride(-1) != 1 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return _KERNELS.serves(first)


def decode_attention_(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      tokens: torch.Tensor, slots: torch.Tensor, last: torch.Tensor, scale: float) -> None:
    """out[tokens[b]] = attention of q[tokens[b]] over positions 0..last[b] of cache slot slots[b], for each
    decoding sequence b (the cache already holds the new tokens' keys and values)."""
    with on_device(q):
        kernels().decode_attention_(out, q, k_cache, v_cache, tokens, slots, last, scale)
