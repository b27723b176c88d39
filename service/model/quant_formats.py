"""Weight storage formats the CPU matmul kernel reads as stored, and conversions into them.

A stored weight is a `StoredWeight`: a 2-D tensor of its rows' bytes (`[out_features, row_bytes]`, uint8 for
the block formats, the element type for the plain ones), its format and its column count. The formats are
llama.cpp's GGUF block types served without dequantising (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, F16, BF16, F32),
and two we make from dense weights at load: BF16 (halves fp32's bytes; bf16 -> fp32 is a shift) and weight-
only INT8 with one fp32 scale per output row (absmax / 127; a quarter of fp32's bytes). `dequantize` is the
reference: gguf's own numpy dequantiser for the block types, torch for the rest; the kernel computes the same
values (csrc/quant_matmul.cpp). Q8_0, Q4_0, Q4_1, F32 and BF16 weights may be held with 16 rows' blocks
interleaved (`interleaved=True`, made by the kernel's `interleave`: same bytes, another order, see
csrc/quant_x16.h; an interleaved F32 / BF16 weight's data is its bytes, uint8, so that nothing takes it for
the dense matrix); `dequantize` and `deinterleave` read that layout too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from adapters_core.watched import WatchedAttributes

# name -> (kernel id, values per block, bytes per block); the ids are csrc/quant_matmul.cpp's `Format`.
FORMATS = {"F32": (0, 1, 4), "BF16": (1, 1, 2), "F16": (2, 1, 2), "I8": (3, 1, 1), "Q8_0": (4, 32, 34),
           "Q4_0": (5, 32, 18), "Q4_1": (6, 32, 20), "Q4_K": (7, 256, 144), "Q6_K": (8, 256, 210)}
KERNEL_COLUMN_MULTIPLE = 16   # the kernel reads rows in 16-value vectors (csrc/quant_matmul.cpp checks K % 16)
INTERLEAVED_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "F32", "BF16")   # can be held interleaved (csrc/quant_x16.h)
INTERLEAVE_ROWS = 16
INTERLEAVE_COLUMNS = 32       # columns of one interleaved block (F32 / BF16 rows need a multiple of it)
X16_KERNEL_IDS = {"Q8_0": 9, "Q4_0": 10, "Q4_1": 11, "F32": 12, "BF16": 13}   # csrc/quant_matmul.cpp
GGUF_FORMATS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")   # GGUF types served as stored


@dataclass
class StoredWeight(WatchedAttributes):
    """A weight matrix in a stored format: `data` [rows, row_bytes], `columns` values per row."""

    data: torch.Tensor
    format: str
    columns: int
    row_scale: Optional[torch.Tensor] = None        # [rows] fp32, INT8 only
    interleaved: bool = False                       # 16 rows' blocks woven together (INTERLEAVED_FORMATS)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown weight format {self.format!r}; known: {', '.join(FORMATS)}")
        _, values, nbytes = FORMATS[self.format]
        if self.columns % values:
            raise ValueError(f"{self.format} stores rows in blocks of {values}; {self.columns} columns do not fit")
        if self.data.dim() != 2 or self.data.shape[1] * self.data.element_size() != self.columns // values * nbytes:
            raise ValueError(f"{self.format} data of shape {tuple(self.data.shape)} does not hold rows of "
                             f"{self.columns} values")

    @property
    def kernel_id(self) -> int:
        return X16_KERNEL_IDS[self.format] if self.interleaved else FORMATS[self.format][0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.columns)

    @property
    def nbytes(self) -> int:
        scale = 0 if self.row_scale is None else self.row_scale.numel() * 4
        return self.data.numel() * self.data.element_size() + scale

    def rows(self, order: torch.Tensor) -> "StoredWeight":
        """The same weight with its rows reordered (rows are independent blocks, so no value changes)."""
        if self.interleaved:
            raise ValueError("rows of an interleaved weight cannot be reordered")
        scale = None if self.row_scale is None else self.row_scale[order].contiguous()
        return StoredWeight(self.data[order].contiguous(), self.format, self.columns, scale)


def dequantize(weight: StoredWeight) -> torch.Tensor:
    """The dense fp32 weight [rows, columns] (the reference the kernel is checked against)."""
    if weight.interleaved:
        weight = deinterleave(weight)
    fmt, data = weight.format, weight.data
    if fmt == "F32":
        return data.view(torch.float32)
    if fmt == "BF16":
        return data.view(torch.bfloat16).to(torch.float32)
    if fmt == "F16":
        return data.view(torch.float16).to(torch.float32)
    if fmt == "I8":
        return data.view(torch.int8).to(torch.float32) * weight.row_scale[:, None]
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    values = gguf_dequantize(data.numpy(), GGMLQuantizationType[fmt])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(weight.shape)


def from_dense(weight: torch.Tensor, fmt: str) -> StoredWeight:
    """A dense [rows, columns] weight in format `fmt` ("F32", "BF16" or "I8")."""
    w = weight.detach().to(torch.float32).contiguous()
    if fmt == "F32":
        return StoredWeight(w, "F32", w.shape[1])
    if fmt == "BF16":
        return StoredWeight(w.to(torch.bfloat16).view(torch.int16), "BF16", w.shape[1])
    if fmt == "I8":
        scale = w.abs().amax(dim=1) / 127.0                                   # [rows]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # [rows, columns]
        return StoredWeight(q, "I8", w.shape[1], scale.contiguous())
    raise ValueError(f"cannot convert a dense weight to {fmt!r}; choose F32, BF16 or I8")


def deinterleave(weight: StoredWeight) -> StoredWeight:
    """An interleaved weight back in GGUF's row layout (the inverse of the kernel's `interleave`)."""
    if not weight.interleaved:
        return weight
    _, values, bb = FORMATS[weight.format]
    if values == 1:                                               # F32 / BF16: value j of row r at j * 16 + r
        n, c = INTERLEAVE_ROWS, INTERLEAVE_COLUMNS
        rows, blocks = weight.data.shape[0], weight.columns // c
        chunks = weight.data.view(torch.uint8).reshape(rows // n, blocks, c, n, bb)   # [g, b, value, row, bytes]
        data = chunks.permute(0, 3, 1, 2, 4).reshape(rows, blocks * c * bb).contiguous()
        return StoredWeight(data, weight.format, weight.columns)
    head = 4 if weight.format == "Q4_1" else 2                    # scale bytes per row block: d (and m)
    rows, blocks, n = weight.data.shape[0], weight.columns // values, INTERLEAVE_ROWS
    chunks = weight.data.view(torch.uint8).reshape(rows // n, blocks, n * bb)      # [groups, blocks, 16 x bb]
    scales = chunks[..., : n * head].reshape(rows // n, blocks, head // 2, n, 2)   # [g, b, d/m, row, 2 bytes]
    quants = chunks[..., n * head:].reshape(rows // n, blocks, bb - head, n)       # [g, b, byte, row]
    scales = scales.permute(0, 3, 1, 2, 4).reshape(rows // n, n, blocks, head)     # [g, row, b, head]
    quants = quants.permute(0, 3, 1, 2)                                            # [g, row, b, byte]
    data = torch.cat([scales, quants], dim=-1).reshape(rows, blocks * bb).contiguous()
    return StoredWeight(data, weight.format, weight.columns)
