"""Which mixed batches take the Triton SGMV kernels (`triton_sgmv.py`), and their segments.

`stack.stacked_forward` asks `add_(layer_stack, x, result, mapping)` before it falls back to the torch path
(`stack._lora_delta`: gathered rows and two `bmm`s, which serves every adapter kind on every device). It
returns True when it added the plain LoRA deltas itself: tensors on a CUDA device (or, for tests and
`bench/gpu_check.py --dry-run`, CPU tensors under Triton's interpreter when asked for), Triton importable,
no gradient wanted, inputs and outputs that view as rows with contiguous features. The segments are the
`BatchMapping`'s own (tokens layout: `seg_slots` and `gather`; rows layout: one segment per row), so
nothing here copies a tensor to the host or waits for the GPU.
`ADAPTERS_CORE_TRITON`: `auto` (default) uses the kernels for CUDA tensors when Triton imports, `0` never
(the torch path everywhere, e.g. to compare both), `1` also for CPU tensors when `TRITON_INTERPRET=1` is set.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Optional

import torch

from .batch_mapping import as_rows

class TritonKernels:
    """A module of Triton kernels imported on first use, and which tensors it serves, under a switch variable:
    `auto` (default) CUDA tensors when Triton imports, `0` none, `1` also CPU tensors when `TRITON_INTERPRET=1`
    is set (Triton's interpreter). `service.model.cuda_ops` keeps its attention kernels the same way."""

    def __init__(self, module: str, switch: str):
        self.name, self.mode = module, os.environ.get(switch, "auto")
        self._module = None       # the imported module, False once its import failed

    def module(self) -> Optional[object]:
        """The module, or None when Triton cannot be imported or the switch is "0"."""
        if self.mode == "0":
            return None
        if self._module is None:
            try:
                self._module = importlib.import_module(self.name)
            except ImportError:
                self._module = False
        return self._module or None

    def serves(self, t: torch.Tensor) -> bool:
        """The kernels take tensors of `t`'s device."""
        if t.is_cuda:
            return self.module() is not None
        return (t.is_cpu and self.mode == "1" and os.environ.get("TRITON_INTERPRET") == "1"
                and self.module() is not None)


_KERNELS = TritonKernels("adapters_core.triton_sgmv", "ADAPTERS_CORE_TRITON")
kernels = _KERNELS.module          # `triton_sgmv`, or None
applies = _KERNELS.serves          # the Triton kernels serve this input's device (see the module docstring)


def add_(st, x: torch.Tensor, result: torch.Tensor, mapping) -> bool:
    """result += the plain LoRA delta of every token of x under `mapping`, with the Triton kernels, when they
    apply (True); else False and nothing changed. `st` is the layer's `LayerStack` with `plain_lora`."""
    if not applies(x) or (torch.is_grad_enabled() and (x.requires_grad or result.requires_grad)):
        return False
    rows_in, rows_out = as_rows(x), as_rows(result)
    if rows_in is None or rows_out is None:
        return False
    a, b = st.padded()                                   # [n, in, R] scale-folded, [n, R, out]
    tokens = rows_in.shape[0]
    if mapping.layout == "rows":
        seg_slots, gather, seg_len = mapping.slots, None, tokens // max(1, mapping.slots.numel())
    else:
        seg_slots, gather, seg_len = mapping.seg_slots, mapping.gather, mapping.seg_len
    with on_device(x):
        kernels().add_lora_(rows_out, rows_in, a, b, seg_slots, gather, seg_len, mapping.token_scales(tokens))
    return True


def on_device(t: torch.Tensor):
    """Triton launches on the thread's current CUDA device: make it `t`'s (the engine steps in its own thread,
    whose current device is cuda:0 whatever device the model was put on)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
