"""`QuantLinear` and `QuantEmbedding`: a linear layer and an embedding table over a `StoredWeight`.

The CPU forward multiplies fp32 activations by the stored rows with the kernel of csrc/quant_matmul.cpp,
which dequantises small tiles in L1 as it goes, so a decode step reads each weight's stored bytes once (a
Q4_1 GGUF: 0.625 bytes a weight instead of fp32's 4). Without the kernel (no compiler, another device,
`ADAPTER_SERVE_QUANT_KERNEL=0`) the layer dequantises once into a cached fp32 copy and uses `F.linear`.

Both are `nn.Linear` / `nn.Embedding` subclasses, so adapters_core targets and wraps them as usual. As with
PEFT on a bitsandbytes base, `weight` is the stored tensor (its dtype is not floating for the block formats,
so adapters are created in fp32), `dequantize()` gives the dense weight (DoRA's norm uses it), and merging
an adapter into stored blocks is refused. An F32-stored layer's `weight` is its dense fp32 tensor itself,
unless it is held interleaved (then, as for every interleaved weight, its bytes).
`QuantGroup` computes q/k/v or gate/up in one kernel call over their concatenated rows, with the same
take-your-slice protocol as `PackedGroup`.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapters_core.native import NativeKernel
from adapters_core.watched import Watched

from .packed_linear import LinearGroup, grouped_output, make_group
from .quant_formats import INTERLEAVE_COLUMNS, INTERLEAVE_ROWS, INTERLEAVED_FORMATS, StoredWeight, dequantize

_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "quant_matmul.cpp")
_SWITCH = "ADAPTER_SERVE_QUANT_KERNEL"
_KERNELS: dict[str, NativeKernel] = {}


def native_kernel(arch: str = "native") -> NativeKernel:
    """The kernel's builder for gcc's -march=`arch` ("native" is the one the service uses)."""
    if arch not in _KERNELS:
        _KERNELS[arch] = NativeKernel("adapter_serve_quant_matmul", _SOURCE, _SWITCH, arch=arch)
    return _KERNELS[arch]


def kernel(arch: str = "native") -> Optional[object]:
    """The compiled kernel for gcc's -march=`arch` (built on first use), or None where it cannot be built."""
    return native_kernel(arch).module()


def matmul(x: torch.Tensor, weight: StoredWeight, bias: Optional[torch.Tensor] = None,
           module: Optional[object] = None) -> torch.Tensor:
    """x [..., K] fp32 @ weight [N, K]^T (+ bias) with the kernel (`module` picks a build; default native)."""
    module = module or kernel()
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = module.quant_matmul(rows, weight.data, weight.kernel_id, weight.row_scale, bias)    # [M, N]
    return out.view(*x.shape[:-1], out.shape[-1])


def interleaved(weight: StoredWeight) -> StoredWeight:
    """`weight` in the kernel's interleaved layout where that applies (Q8_0 / Q4_0 / Q4_1 / F32 / BF16 with
    rows in whole groups of 16 and columns in blocks of 32, the kernel built, `ADAPTER_SERVE_INTERLEAVE` not
    0), else `weight` itself. The result's data is uint8 (the layout's bytes)."""
    module = kernel()
    if (module is None or weight.interleaved or weight.format not in INTERLEAVED_FORMATS
            or weight.shape[0] % INTERLEAVE_ROWS or weight.columns % INTERLEAVE_COLUMNS
            or os.environ.get("ADAPTER_SERVE_INTERLEAVE", "1") == "0"):
        return weight
    data = module.interleave(weight.data.contiguous().view(torch.uint8), weight.kernel_id, weight.columns)
    return StoredWeight(data, weight.format, weight.columns, None, interleaved=True)


def _kernel_usable(x: torch.Tensor) -> bool:
    return (x.is_cpu and x.dtype == torch.float32 and not (torch.is_grad_enabled() and x.requires_grad)
            and kernel() is not None)


class QuantLinear(Watched, nn.Linear):
    """y = x @ W^T + b with W kept in a stored format (see the module docstring)."""

    _group: Optional[tuple["LinearGroup", int]] = None
    _unwatched = frozenset({"_dense"})                 # the dequantised copy, made once when needed

    def __init__(self, stored: StoredWeight, bias: Optional[torch.Tensor] = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = stored.shape
        self.stored = stored
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32), requires_grad=False)
        self._dense: Optional[torch.Tensor] = None

    @property
    def weight(self) -> torch.Tensor:                  # the stored tensor, as bitsandbytes' layers expose theirs
        return self.stored.data

    def dequantize(self) -> torch.Tensor:
        """The dense fp32 weight [out, in] (for F32 storage held as is, the stored tensor itself)."""
        return dequantize(self.stored)

    def dense_for_fallback(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.dequantize()
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = grouped_output(self, x)
        if out is not None:
            return out
        if _kernel_usable(x):
            return matmul(x, self.stored, self.bias)
        dense = self.dense_for_fallback().to(device=x.device, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, dense, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.stored.format}"


class QuantEmbedding(nn.Embedding):
    """An embedding table whose rows are dequantised on look-up (a tied head shares the stored rows)."""

    def __init__(self, stored: StoredWeight, padding_idx: Optional[int] = None):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = stored.shape
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.stored = stored

    @property
    def weight(self) -> torch.Tensor:
        return self.stored.data

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.stored)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        module = kernel() if ids.is_cpu else None
        flat = ids.reshape(-1).contiguous()
        if module is not None:
            rows = module.dequant_rows(self.stored.data, self.stored.kernel_id, self.stored.columns, flat)
            if self.stored.row_scale is not None:
                rows = rows * self.stored.row_scale.index_select(0, flat)[:, None]
        else:
            rows = self.dequantize().index_select(0, flat)
        return rows.view(*ids.shape, self.embedding_dim)                           # [..., d]


class QuantGroup(LinearGroup):
    """QuantLinear members with one format and input size, computed as one matmul over their joined rows."""

    def __init__(self, members: Sequence[QuantLinear]):
        super().__init__(members)
        first = members[0].stored
        self.stored = StoredWeight(torch.cat([m.stored.data for m in members]), first.format, first.columns,
                                   None if first.row_scale is None else torch.cat([m.stored.row_scale
                                                                                   for m in members]),
                                   first.interleaved)   # interleaved members hold whole 16-row groups
        start = 0
        for m in members:             # members keep views of the joined rows: the weights are held once
            end = start + m.out_features
            scale = None if first.row_scale is None else self.stored.row_scale[start:end]
            m.stored = StoredWeight(self.stored.data[start:end], first.format, first.columns, scale,
                                    first.interleaved)
            start = end
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat([
            b if b is not None else torch.zeros(m.out_features) for m, b in zip(members, biases)])

    def usable(self, x: torch.Tensor) -> bool:
        return all(type(m) is QuantLinear for m in self.members) and _kernel_usable(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.stored, self.bias)


def group_quant_linears(members: Sequence[nn.Module]) -> Optional[QuantGroup]:
    """A `QuantGroup` of `members` when all are QuantLinear of one format and input size, else None."""
    return make_group(members, QuantLinear, lambda m: (m.stored.format, m.stored.interleaved, m.in_features),
                      QuantGroup)
