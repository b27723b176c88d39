"""`save_packed` / `map_packed`: an adapter's packed tensors kept in a file in the layout they are served in, and
mapped back into memory without a copy.

`read_packed_safetensors` puts a PEFT file's tensors into fresh buffers as the stacks read them (each LoRA B
transposed, factors cast to the server's adapter dtype): every load copies each byte, faults in fresh pages
and transposes B. A server that loads the same adapters again and again (thousands registered, a few hundred
resident) can instead keep that result in a file of its own and map it: the pages are the kernel's page cache,
shared, mapped without a copy, and freed by the kernel, not the heap. The file is a safetensors file (any
safetensors reader opens it): each tensor as held, a B factor stored as its Bt [r, out] (listed in the metadata
under `transposed`), the data starting at a 64-byte boundary, with the caller's metadata (what the file was
made from). The mapping is private and writable, so a write into a mapped tensor (nothing in the serving path
writes factors) copies its page instead of reaching the file or faulting; its pages are filled at once where
the kernel has `MADV_POPULATE_READ` (Linux 5.14), otherwise they are read ahead and fault in on first use. The
fill keeps the GIL where `mincore` finds the whole file in the page cache (`held_io.populate_if_resident`: page
tables only, ~0.1 ms for a 4.5 MiB adapter, where giving the GIL up beside a busy event loop cost up to the 5 ms
switch interval), else it is asked for through libc with the GIL released (Python's `mmap.madvise` keeps it: a
file not in the page cache held every other thread of a server for the disk read, 2-9 ms an adapter). Mapping a
cached file keeps the GIL throughout: where the C++ kernels are built, the header is parsed and checked and every
tensor made as a view of the mapping in one call (`csrc/packed_header.h`: ~0.2 instead of ~0.45 ms of Python for a
SmolLM2 adapter's 120 tensors), else each dtype's run is a `frombuffer` of the mapping and its tensors `as_strided`
views of it. A reader with files queued can have another thread map and fill each ahead (`premap`,
the GIL released: a disk read or the page-table fill beside the reader's Python) and pass the result to
`map_packed`, which uses it when the file is still the one mapped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
import mmap
import os
import struct
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import held_io, sgmv

FORMAT = "adapters_core packed"
ALIGN = 64
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)      # Linux >= 5.14
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}


def save_packed(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (CPU; each contiguous, or the transpose of a contiguous 2-D storage as a packed LoRA B is)
    to `path`: written beside it, fsynced and renamed into place, so a reader finds the whole file or none."""
    stored, transposed = {}, []
    for key, t in tensors.items():
        if t.dtype not in _CODES or t.device.type != "cpu":
            raise ValueError(f"{key}: a {t.dtype} tensor on {t.device} cannot be saved packed")
        if not t.is_contiguous() and t.dim() == 2 and t.T.is_contiguous():
            t = t.T
            transposed.append(key)
        stored[key] = t.contiguous()
    header: dict = {"__metadata__": {**metadata, "format": FORMAT, "transposed": json.dumps(transposed)}}
    offset = 0
    # wider dtypes first (each tensor aligned), each dtype's tensors together (`map_packed` splits them at once)
    for key in sorted(stored, key=lambda k: (-stored[k].element_size(), _CODES[stored[k].dtype])):
        size = stored[key].numel() * stored[key].element_size()
        header[key] = {"dtype": _CODES[stored[key].dtype], "shape": list(stored[key].shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    header = {"__metadata__": header["__metadata__"], **{k: header[k] for k in stored}}   # the tensors' order
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)                   # safetensors allows trailing spaces
    parts = [struct.pack("<Q", len(text)) + text] + [
        memoryview(stored[k].view(-1).view(torch.uint8).numpy())
        for k in sorted(stored, key=lambda k: header[k]["data_offsets"][0]) if stored[k].numel()]
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, parts)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _write_all(fd: int, parts: list) -> None:
    """Every byte of `parts` to `fd` in as few `writev` calls as the system allows (each drops the GIL once,
    where a write per tensor dropped and took it back hundreds of times beside a busy server)."""
    queue = [memoryview(p).cast("B") for p in parts if len(p)]
    limit = _iov_max()
    while queue:
        done = os.writev(fd, queue[:limit]) if limit > 1 else os.write(fd, queue[0])
        if done <= 0:
            raise OSError(f"wrote nothing of {sum(len(q) for q in queue)} bytes")
        while done:                                               # drop what was written, keep a partial tail
            if done >= len(queue[0]):
                done -= len(queue.pop(0))
            else:
                queue[0], done = queue[0][done:], 0


def _iov_max() -> int:
    """How many buffers one `writev` takes (1: no `writev` here, one `write` each)."""
    if not hasattr(os, "writev"):
        return 1
    try:
        return max(1, os.sysconf("SC_IOV_MAX"))
    except (AttributeError, ValueError, OSError):
        return 16


@dataclass(frozen=True)
class Premapped:
    """A packed file mapped as `map_packed` maps it, its page tables filled (`premap`), and the identity
    (`held_io.stat_identity`) of the file at `path` it was mapped from."""
    path: str
    mapped: object
    address: int
    identity: tuple


@functools.cache
def can_premap() -> bool:
    """Whether `premap` works here (Linux's libc through ctypes, with statx)."""
    if not held_io.available() or libc_madvise() is None:
        return False
    try:
        held_io.stat_identity(os.curdir)
    except NotImplementedError:
        return False
    return True


def premap(path: str) -> Premapped:
    """`path` mapped and its page tables filled with the GIL released (libc's `madvise` through ctypes, disk
    reads included), for a thread other than the reader's to do ahead of `map_packed`: a loader with reads
    queued takes each file's mapping ready instead of filling it itself. Raises OSError when the file cannot be
    mapped, or was replaced while it was (the reader then maps it itself), NotImplementedError where
    `can_premap` is False."""
    if not can_premap():
        raise NotImplementedError("premap needs Linux's libc")
    got = _map_identified(path)
    if len(got.mapped) and libc_madvise()(got.address, len(got.mapped), MADV_POPULATE_READ) != 0:
        libc_madvise()(got.address, len(got.mapped), mmap.MADV_WILLNEED)   # (before Linux 5.14: read ahead)
    return got


def map_resident(path: str, limit: int) -> Optional[Premapped]:
    """`path` mapped as `premap` maps it, its page tables filled with the GIL kept, when the file is at most
    `limit` bytes and every page of it is in the page cache; else None (missing, empty, larger, a page not
    cached, replaced while it was mapped, or `can_premap` False here). For a reader that reads such a file where
    it is (the fill takes ~0.1 ms per 4 MiB) and hands anything that may wait for a disk to a thread."""
    if not can_premap():
        return None
    try:
        got = _map_identified(path, limit)
    except OSError:
        return None
    return got if held_io.populate_if_resident(got.address, len(got.mapped), MADV_POPULATE_READ) else None


def _map_identified(path: str, limit: Optional[int] = None) -> Premapped:
    """`path` mapped (`held_io.map_private`, not filled) with its identity; OSError when it is missing, larger
    than `limit` (or empty, with a limit), or was replaced while it was mapped."""
    identity = held_io.stat_identity(path)
    if identity is not None and limit is not None and not 0 < identity[2] <= limit:
        raise OSError(f"{path}: {identity[2]} bytes, not 1 to {limit}")
    mapped, address = held_io.map_private(path)
    if identity is None or held_io.stat_identity(path) != identity:
        raise OSError(f"{path} was replaced while it was mapped")
    return Premapped(path, mapped, address, identity)


def _taken(ahead: Union[Future, Premapped, None], path: str) -> Optional[Premapped]:
    """`ahead`'s mapping (a `Premapped`, or a future of one that is done) if it still maps the file at `path`, else
    None (a premap not begun yet is cancelled: the reader maps the file itself)."""
    if ahead is None:
        return None
    if isinstance(ahead, Premapped):
        got = ahead
    else:
        if not ahead.done():
            ahead.cancel()
            return None
        if ahead.cancelled() or ahead.exception() is not None:
            return None
        got = ahead.result()
    if got.path != path or held_io.stat_identity(path) != got.identity:    # replaced since: map it anew
        return None
    return got


def map_packed(path: str, ahead: Union[Future, Premapped, None] = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(the tensors `save_packed` wrote, in its order and layout, sharing one private mapping of the file; its
    metadata). Raises OSError when the file cannot be read and ValueError when it is not a whole packed file.
    `ahead`: the file mapped already (`map_resident`), or a future of `premap(path)` begun on another thread;
    that mapping is used when it is there and the file has not been replaced since, else the file is mapped
    here."""
    got = _taken(ahead, path)
    if got is not None:
        mapped, address = got.mapped, got.address
    else:
        mapped, address = _map(path)
        _populate(mapped, address)                                # page tables filled now, pages still shared
    k = sgmv.kernel()
    if k is not None and len(mapped) >= 8:
        # the header parsed and checked, every view made, in one call keeping the GIL (csrc/packed_header.h)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)          # ("not writable": a read-only mapping)
            data = torch.frombuffer(mapped, dtype=torch.uint8)    # [length], holds the mapping open
        return k.packed_views(data, FORMAT, path)
    raw = memoryview(mapped)                                      # [length] bytes
    length = len(raw)
    if length < 8:
        raise ValueError(f"{path}: shorter than a safetensors header")
    (header_len,) = struct.unpack_from("<Q", raw, 0)
    if header_len > min(length - 8, 1 << 24):
        raise ValueError(f"{path}: header length {header_len} does not fit the file")
    header = json.loads(bytes(raw[8:8 + header_len]))
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a packed adapter file")
    base = 8 + header_len
    end = base + max((e["data_offsets"][1] for e in header.values()), default=0)
    if end != length:
        raise ValueError(f"{path}: {length} bytes, its header says {end}")
    transposed = set(json.loads(metadata.get("transposed", "[]")))
    bases, typed = [], {}           # one view per dtype's run; dtype code -> (its base, itemsize, element 0's offset)
    for code, run in _runs(path, header, length - base).items():
        size = _DTYPES[code].itemsize
        start, (last, _, last_shape) = run[0][0], run[-1]
        count = (last - start) // size + math.prod(last_shape)
        # [count] of the run's dtype, from the mapping itself (holds it open): `frombuffer` keeps the GIL, where
        # a slice and `.view(dtype)` of one uint8 tensor let it go (torch's bindings of view ops do)
        view = torch.frombuffer(mapped, dtype=_DTYPES[code], count=count, offset=base + start) if count else \
            torch.empty(0, dtype=_DTYPES[code])
        typed[code] = (len(bases), size, -(start // size))
        bases.append(view)
    which, sizes, strides, offsets = [], [], [], []               # per tensor, in the saved order
    for key, entry in header.items():
        index, size, origin = typed[entry["dtype"]]
        shape = entry["shape"]
        which.append(index)
        offsets.append(origin + entry["data_offsets"][0] // size)
        if key in transposed:                                     # a B: Bt [r, out] stored, B [out, r] given
            if len(shape) != 2:
                raise ValueError(f"{path}: {key} is listed as transposed but has shape {shape}")
            sizes.append([shape[1], shape[0]])
            strides.append([1, shape[1]])
        else:
            sizes.append(list(shape))
            strides.append(list(_contiguous_strides(shape)))
    views = [bases[b].as_strided(z, st, o) for b, z, st, o in zip(which, sizes, strides, offsets)]
    return dict(zip(header, views)), metadata


def _contiguous_strides(shape: list[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of `shape`, in elements (as torch gives them: empty extents count as 1)."""
    strides, step = [], 1
    for extent in reversed(shape):
        strides.append(step)
        step *= max(extent, 1)
    return tuple(reversed(strides))


def _map(path: str) -> tuple[object, Optional[int]]:
    """(the file mapped private and writable, as a buffer; its address, or None where it is not known). Through
    libc with the GIL kept where that is possible (`held_io`: a loader's open, mmap and close each waited up
    to 5 ms for the GIL beside a busy event loop), else through Python's `mmap`."""
    if held_io.available() and libc_madvise() is not None:
        return held_io.map_private(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE), None
    finally:
        os.close(fd)


def _populate(mapped, address: Optional[int] = None) -> None:
    """Fill the mapping's page tables now (reading from disk what the page cache lacks): with the GIL kept when
    the page cache holds every page (`held_io.populate_if_resident`), else with it released (a ctypes call to
    libc's `madvise` drops it, `mmap.madvise` does not). Falls back to `mmap.madvise`, and to
    `MADV_WILLNEED` (read ahead; pages fault in on first use) where the kernel lacks `MADV_POPULATE_READ`.
    `mapped` is a Python `mmap` (its address found here) or `held_io.map_private`'s array at `address`."""
    madvise = libc_madvise()
    if madvise is not None and len(mapped):
        if address is None:
            try:
                address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))   # valid while `mapped` is open
            except TypeError:                           # a read-only mapping exports no writable buffer
                address = None
        if address is not None:
            if held_io.available() and held_io.populate_if_resident(address, len(mapped), MADV_POPULATE_READ):
                return                                  # all cached: filled with the GIL kept (see there)
            if madvise(address, len(mapped), MADV_POPULATE_READ) == 0:
                return
            if not isinstance(mapped, mmap.mmap):       # no Python mmap to fall back on: read ahead instead
                madvise(address, len(mapped), mmap.MADV_WILLNEED)
                return
    if not isinstance(mapped, mmap.mmap) or not len(mapped):
        return
    try:
        mapped.madvise(MADV_POPULATE_READ)
    except OSError:
        mapped.madvise(mmap.MADV_WILLNEED)


@functools.cache
def libc_madvise():
    """libc's `madvise(addr, length, advice)` through ctypes (which releases the GIL during the call; errno kept
    for `ctypes.get_errno`), or None where libc is not reachable. service/model/huge_pages.py uses it too."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _runs(path: str, header: dict, data_bytes: int) -> dict[str, list]:
    """dtype code -> its tensors' (start, key, shape) in file order, checked to lie one after another inside the
    data section, each ending where its shape says, aligned to its dtype (ValueError otherwise)."""
    runs: dict[str, list] = {}
    for key, entry in header.items():
        if entry.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: {key} has dtype {entry.get('dtype')!r}")
        runs.setdefault(entry["dtype"], []).append((entry["data_offsets"][0], key, tuple(entry["shape"])))
    for code, run in runs.items():
        size = _DTYPES[code].itemsize
        run.sort(key=lambda entry: (entry[0], math.prod(entry[2])))      # (an empty tensor before one at its start)
        stop = run[0][0]
        for at, key, shape in run:
            if at != stop or min(shape, default=0) < 0:
                raise ValueError(f"{path}: {key} is not where the {code} tensors before it end")
            stop += math.prod(shape) * size
            if header[key]["data_offsets"][1] != stop:
                raise ValueError(f"{path}: {key}'s offsets do not fit its shape")
        if run[0][0] < 0 or run[0][0] % size or stop > data_bytes:
            raise ValueError(f"{path}: the {code} tensors do not fit the file")
    return runs


def source_identity(path: str) -> Optional[str]:
    """The file's device, inode, size, modification and change times as one string (None when it is missing):
    what a packed file records of the file it was made from, so a file replaced or rewritten since is noticed
    (the change time too: a rewrite that puts the old modification time back still moves it). Through statx
    with the GIL held where that is possible (a loader asks on every load: `held_io`)."""
    if held_io.available():
        try:
            got = held_io.stat_identity(path)
        except NotImplementedError:
            pass
        else:
            return None if got is None else "%d:%d:%d:%d:%d" % got
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
