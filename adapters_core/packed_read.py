"""`read_packed_safetensors`: an adapter's safetensors file read straight into its packed buffers.

`pack_adapter_tensors` lays an adapter out as the stacks read it (one buffer per dtype, LoRA B stored
transposed); reading the file first with safetensors' `load_file` and packing after made two allocations and
two copies of every byte. Measured for a 44 MB rank-36 fp32 SmolLM2 adapter on the loader thread (2 cores):
`load_file` 7-8 ms and the pack 29-35 ms, most of it the page faults of two fresh 44 MB allocations and B's
strided transposed copy from memory. Here the buffers are allocated once and each tensor's bytes are read
from the file into its place in them; a tensor whose layout or dtype changes on the way (a 2-D B, which is
stored transposed; a factor cast to `factor_dtype`) is read into a small scratch buffer and copied from
there, while it is still in the cache, B by the fused kernel's tiled transpose (`sgmv.transpose_copy_`:
torch's strided copy took ~20 ms of the 44 MB adapter's B factors). Where the kernel is built and every
tensor is fp32 / bf16 / fp16, the file is mapped and one kernel call (`unpack_`) puts every tensor in place
from it (copied, cast or transposed): a 3.9 MB bf16 SmolLM2 adapter on q/v read in 2.3 ms instead of 3.3
(the call ~1 ms of it), where the Python per tensor had also handed the GIL to the server's other threads
240 times. The buffers are plain allocations: asking for transparent huge pages (`madvise`) once made
a fresh 44 MB buffer fill faster, but on a machine whose memory has run a while the kernel compacts memory
to find them (the `madvise` defrag policy), and filling a fresh 4 MB buffer took 3.8-4.6 ms instead of
0.9-1.0 (44 MB: 53 ms instead of 10). The kernel path checks each tensor finite as it writes it, so the
loader makes no second pass over the adapter. The result equals `pack_adapter_tensors(load_file(path),
factor_dtype)` (same keys, shapes, dtypes, values, layout). safetensors itself checks the header first
(offsets inside the file, no overlaps, known dtypes), so a malformed or truncated file fails as it does with
`load_file`.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from typing import Callable, Optional

import torch
from safetensors import safe_open

from . import sgmv
from .packing import factor_target, is_lora_b

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_packed_safetensors(path: str, factor_dtype: Optional[torch.dtype] = None,
                            skip: Optional[Callable[[str], bool]] = None
                            ) -> Optional[tuple[dict, int, Optional[list[str]]]]:
    """(the file's tensors as `pack_adapter_tensors` would lay them out, in `load_file`'s key order; the bytes
    of their data in the file; the keys of the tensors holding an inf or a NaN once read, or None where this
    read did not check: the one-call kernel path checks each tensor as it writes it, the per-tensor path does
    not), or None when the file holds a dtype this reader does not map (the caller then reads and packs it the
    general way). Tensors whose key `skip` accepts are left unread (their bytes still count in the file's).
    Raises what safetensors raises for a malformed file, and OSError when the file is shorter than its header
    says."""
    with safe_open(path, framework="pt") as f:                  # validates the header against the file
        keys = list(f.offset_keys())
    with open(path, "rb", buffering=0) as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        data_start = 8 + header_len
        entries = []                                              # (file offset, key, file dtype, shape, target)
        file_bytes = 0
        for key in keys:
            entry = header[key]
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                return None
            shape = tuple(entry["shape"])
            file_bytes += math.prod(shape) * dtype.itemsize
            if skip is None or not skip(key):
                entries.append((data_start + entry["data_offsets"][0], key, dtype, shape,
                                factor_target(key, dtype, factor_dtype)))
        keys = [entry[1] for entry in entries]                   # (in the file's key order, the skipped left out)
        sizes: dict[torch.dtype, int] = {}
        for _, _, dtype, shape, target in entries:
            sizes[target] = sizes.get(target, 0) + math.prod(shape)
        slabs = {dtype: torch.empty(n, dtype=dtype) for dtype, n in sizes.items()}
        ordered = sorted(entries, key=lambda e: e[0])                        # one pass over the file
        regions = {target: iter(slab.split([math.prod(e[3]) for e in ordered if e[4] is target]))
                   for target, slab in slabs.items()}                        # each tensor's place, in file order
        placed = []                      # (file offset, key, file dtype, shape, its place in a slab, B transposed)
        for offset, key, dtype, shape, target in ordered:
            region = next(regions[target])
            flip = len(shape) == 2 and is_lora_b(key)
            # Bt [r, out] for a B (its [out, r] view is the tensor), else the tensor as stored
            placed.append((offset, key, dtype, shape, region.view(shape[1], shape[0]) if flip else region.view(shape),
                           flip))
        out = {key: dst.T if flip else dst for _, key, _, _, dst, flip in placed}
        k = sgmv.kernel()
        codes = sgmv.DTYPE_CODES
        if k is not None and all(dtype in codes and target in codes for _, _, dtype, _, target in entries):
            # the file mapped, every tensor put into place from it in one call (see `csrc/unpack.h`'s unpack_)
            finite = _unpack_mapped(k, fh, [p[4] for p in placed], [p[0] for p in placed],
                                    [codes[p[2]] for p in placed], [int(p[5]) for p in placed])
            nonfinite = [p[1] for p, ok in zip(placed, finite) if not ok]
            return {key: out[key] for key in keys}, file_bytes, nonfinite
        scratch_bytes = max((math.prod(shape) * dtype.itemsize for _, key, dtype, shape, target in entries
                             if _through_scratch(key, dtype, shape, target)), default=0)
        scratch = torch.empty(scratch_bytes, dtype=torch.uint8)
        with torch.no_grad():
            for offset, key, dtype, shape, dst, flip in placed:
                if not _through_scratch(key, dtype, shape, dst.dtype):
                    _read_into(fh, offset, dst)
                    continue
                staged = scratch[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                _read_into(fh, offset, staged)
                if flip:
                    sgmv.transpose_copy_(dst, staged)                                  # Bt [r, out] = B^T
                else:
                    dst.copy_(staged)
    return {key: out[key] for key in keys}, file_bytes, None


def _unpack_mapped(k, fh, dsts: list, starts: list, codes: list, transposed: list) -> list[bool]:
    """`k.unpack_` (which says, per tensor, whether it is all finite) from the file mapped read-only (its page
    cache, no copy of the file in process memory: a 4 MB buffer read per load and freed left the loader
    thread's malloc arena fragmented, +30 % RSS per resident adapter). The file's length was checked against
    its header by safetensors."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)     # page tables filled at once, not per fault
    with mmap.mmap(fh.fileno(), 0, flags=flags, prot=mmap.PROT_READ) as mapped:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)      # "not writable": it is only read
            data = torch.frombuffer(mapped, dtype=torch.uint8)
        try:
            return k.unpack_(data, dsts, starts, codes, transposed)
        finally:
            del data                      # the mapping closes only once no tensor exports it


def _through_scratch(key: str, dtype: torch.dtype, shape: tuple, target: torch.dtype) -> bool:
    return target != dtype or (len(shape) == 2 and is_lora_b(key))


def _read_into(fh, offset: int, tensor: torch.Tensor) -> None:
    """Fill contiguous `tensor` with the file's bytes at `offset`."""
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
    fh.seek(offset)
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise OSError(f"the file ends {len(view) - done} bytes before a tensor's data does")
        done += got
