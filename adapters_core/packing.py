"""`pack_adapter_tensors`: an adapter's tensors in one allocation, its LoRA B factors laid out as the stacks read them.

A mixed batch reads each LoRA adapter in place (`stack.LayerStack`): A [r, in] as stored and B [out, r]
through its transpose Bt [r, out], which must be contiguous. Tensors fresh from a safetensors file are
separate allocations with B row-major, so the first mixed batch would copy every B once (on the serving
thread) and leave the file's B buffers behind as freed holes in the heap: 64 mixed-rank adapters measured
1.46x their weight bytes in RSS that way. Packing first, off the serving thread (a server's loader thread),
copies every tensor once into one buffer per dtype, each B stored transposed (the returned tensor is a
[out, r] view of that storage, equal in value), so loading and serving then copy nothing and an adapter's
memory is one block of its weight bytes, freed as one when the adapter goes.

A server may also hold its adapters in another dtype than their checkpoints' (vLLM's `--lora-dtype`): with
`factor_dtype`, the tensors of the low-rank products (`is_factor_tensor`) are cast in that same copy. Only
those: they are nearly all of an adapter's bytes, while the vectors that multiply a whole layer's input or
output (IA3's, DoRA's magnitudes) would cost accuracy for no bytes worth saving.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

import torch

# PEFT's keys of LoRA's B factor: LoRA linear / Conv1D, LoRA embedding, AdaLoRA
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B", ".lora_B")
# the tensors of a low-rank product: LoRA's A and B (B's bias goes with B: one nn.Linear holds both), LoRA
# embedding's A and B, AdaLoRA's A, E and B (E is the product's middle factor, and PEFT's forward multiplies
# A * E, so the three share a dtype)
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B",
                    ".lora_A", ".lora_E", ".lora_B")


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim(0)`, which also releases whole free
    pages inside its arenas; ~0.5 ms with 128 SmolLM2 adapters resident). A server that loads and evicts
    adapters all day frees buffers of every size, and the holes they leave between live ones stayed resident:
    128 adapters of 4.06 MiB took 4.65 MiB each in process, 4.17 with a trim after each load. Called with the
    GIL held (ctypes' `PyDLL`): a loader that let it go here beside a busy event loop waited up to the 5 ms
    switch interval to get it back, more than the trim takes. Elsewhere (no glibc) nothing happens."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    """The C library, on Linux; else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.PyDLL(None, use_errno=True)          # calls keep the GIL (see trim_heap)
    except (OSError, AttributeError):
        return None
    return libc


def is_lora_b(key: str) -> bool:
    return key.endswith(_B_SUFFIXES)


def is_factor_tensor(key: str) -> bool:
    """Whether PEFT's key `key` holds a tensor of a LoRA / AdaLoRA product (what `factor_dtype` casts); not
    IA3 vectors, DoRA magnitudes, prompt embeddings, `modules_to_save` copies or base biases."""
    return key.endswith(_FACTOR_SUFFIXES)


def factor_target(key: str, dtype: torch.dtype, factor_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a tensor of `dtype` under PEFT's key `key` is held in: `factor_dtype` for a floating factor
    tensor, else its own."""
    if factor_dtype is not None and dtype.is_floating_point and is_factor_tensor(key):
        return factor_dtype
    return dtype


def cast_factor_tensors(tensors: dict[str, torch.Tensor],
                        factor_dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """The same dict with every factor tensor in `factor_dtype` (None: `tensors` itself, untouched)."""
    if factor_dtype is None:
        return tensors
    return {key: t.to(factor_target(key, t.dtype, factor_dtype)) for key, t in tensors.items()}


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def pack_adapter_tensors(tensors: dict[str, torch.Tensor],
                         factor_dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The same tensors (same keys, shapes and values; same dtypes, except factor tensors in `factor_dtype` when
    it is given) as views of one contiguous buffer per dtype and device, with each 2-D LoRA B stored transposed."""
    dtypes = {key: factor_target(key, t.dtype, factor_dtype) for key, t in tensors.items()}
    sizes: dict[tuple, int] = {}
    for key, t in tensors.items():
        sizes[(dtypes[key], t.device)] = sizes.get((dtypes[key], t.device), 0) + t.numel()
    slabs = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in sizes.items()}
    offsets = dict.fromkeys(slabs, 0)
    out = {}
    with torch.no_grad():
        for key, t in tensors.items():
            where = (dtypes[key], t.device)
            start = offsets[where]
            region = slabs[where][start:start + t.numel()]
            offsets[where] = start + t.numel()
            if t.dim() == 2 and is_lora_b(key):
                bt = region.view(t.shape[1], t.shape[0])                        # [r, out]
                bt.copy_(t.T)                                                    # (and cast, with factor_dtype)
                out[key] = bt.T                                                  # [out, r], transposed storage
            else:
                out[key] = region.view(t.shape).copy_(t)
    return out
