"""The optional fused CPU kernel for decode-shaped mixed batches (`csrc/sgmv.cpp`), built on first use.

For one token per segment (a decode step), `stacked_forward` can replace its gather + two `bmm`s with one
call that reads each token's adapter rows straight from the stacks and accumulates in fp32: measured on
the development CPU for SmolLM2's 210 adapted layers and 16 distinct rank-16 adapters, 6.4 ms per step
against 12.5 ms for the fp32 `bmm`s on gathered copies (bf16 stacks); with the AVX-512 version (built
where the compiler targets it), 6.2 ms against 8.5 ms for the portable loops on an AMD EPYC (Zen 4) and
2.3 ms against 7.7 ms when the adapters' rows are cache-hot: a decode step streams 156 MB of adapter
rows, so the kernel is bound by memory there. It is compiled with
`torch.utils.cpp_extension` (needs a C++ compiler with OpenMP and the `ninja` package) into torch's
extension cache (`TORCH_EXTENSIONS_DIR`). Where that fails, or with `ADAPTERS_CORE_SGMV=0`, the torch
path runs instead, with the same results to rounding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from typing import Optional

import torch

log = logging.getLogger("adapters_core")
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "sgmv.cpp")
_lock = threading.Lock()
_module = None
_tried = False


def _cpu_key() -> str:
    """A short hash of the CPU's feature flags: the build uses -march=native, so an extension cache shared by
    machines with other CPUs (a mounted home, a copied volume) must not hand one machine another's build."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def kernel() -> Optional[object]:
    """The compiled module (built once per process, from the cache when it exists), or None."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("ADAPTERS_CORE_SGMV", "1") != "0":
            try:
                from torch.utils.cpp_extension import load
                _module = load(f"adapters_core_sgmv_{_cpu_key()}", [_SOURCE], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                               extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as exc:  # no compiler, no ninja, a sandbox: the torch path still works
                log.warning("adapters_core: the fused CPU kernel is unavailable (%s); using torch ops", exc)
                _module = None
        _tried = True
    return _module


def sgmv_add_(result: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
              slots: torch.Tensor) -> torch.Tensor:
    """result[g] += x[g] @ A[slots[g]] @ B[slots[g]] in place (fp32 accumulation): result [G, out] and
    x [G, in] with contiguous rows, stacks A [n, in, R] / B [n, R, out], slots [G] int64."""
    kernel().sgmv_add_(result, x, a_stack, b_stack, slots)
    return result
