"""`save_packed` / `map_packed`: an adapter's packed tensors (`read_packed_safetensors`'s output, LoRA B held
transposed) saved in that layout and mapped back equal in keys, order, shapes, dtypes, values and strides; the
file is a safetensors file any reader opens, with its data 64-byte aligned; a write into a mapped tensor copies
its page and leaves the file alone; malformed, truncated or foreign files are refused; the mapping's pages are
filled with the GIL kept where the page cache holds them, else through libc's madvise (the GIL released), or
through `mmap.madvise` where libc is not reachable; mapping a cached file keeps the GIL throughout."""
import json
import mmap
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapters_core import packed_file
from adapters_core.packed_file import ALIGN, map_packed, save_packed, source_identity
from adapters_core.packed_read import read_packed_safetensors

from _models import adapter_tensors
from gil_check import lets_the_gil_go


@pytest.fixture
def packed(tmp_path):
    source = os.path.join(tmp_path, "adapter_model.safetensors")
    save_file(adapter_tensors(with_bool=True), source)
    return read_packed_safetensors(source, torch.bfloat16)[0]


@pytest.mark.parametrize("ways", ["held_io and packed_views", "python's mmap and as_strided"])
def test_mapped_tensors_equal_the_packed_ones(tmp_path, monkeypatch, packed, ways):
    """Mapped through libc with the header read and the views made in one C++ call where both are there, else
    through Python's mmap, json and one as_strided a tensor (no libc, no built kernel): the same tensors."""
    if ways.startswith("python"):
        monkeypatch.setattr(packed_file.held_io, "available", lambda: False)
        monkeypatch.setattr(packed_file.sgmv, "kernel", lambda arch="native": None)
    path = os.path.join(tmp_path, "served.safetensors")
    save_packed(path, packed, {"source": "x", "file_bytes": "12"})
    got, metadata = map_packed(path)
    assert list(got) == list(packed) and metadata["source"] == "x" and metadata["file_bytes"] == "12"
    for key, want in packed.items():
        assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
        assert got[key].stride() == want.stride() and torch.equal(got[key], want), key
    assert not got["m.q.lora_B.weight"].is_contiguous() and got["m.q.lora_B.weight"].T.is_contiguous()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def _both_ways(monkeypatch, path: str) -> list:
    """map_packed(path) through the kernel's one call (csrc/packed_header.h) and through the Python path; each
    way's result, or the exception it raised."""
    if packed_file.sgmv.kernel() is None:
        pytest.skip("the native kernels are not built here")
    got = []
    for native in (True, False):
        with monkeypatch.context() as patch:
            if not native:
                patch.setattr(packed_file.sgmv, "kernel", lambda arch="native": None)
            try:
                got.append(map_packed(path))
            except Exception as exc:                 # (compared by the caller)
                got.append(exc)
    return got


def test_the_native_header_reader_matches_the_python_one(tmp_path, monkeypatch):
    """Names with escapes and non-ASCII letters, empty tensors before others at their offset, every dtype and a
    transposed B: the kernel's reader gives what the Python path gives, in order, as views of one mapping."""
    path = os.path.join(tmp_path, "served.safetensors")
    b = torch.randn(5, 3)
    tensors = {"z.empty": torch.zeros(0, 4), 'q"uote\\d\u00e9\n': torch.randn(2, 3),
               "é.ü.λ.𝔸": torch.arange(6).int(), "a.lora_B.weight": b.T.contiguous().T,
               "h": torch.randn(7).half(), "flags": torch.tensor([True]), "y.empty": torch.zeros(0).half(),
               "d": torch.randn(2, 2).double()}
    save_packed(path, tensors, {"source": "s", "note": 'with "quotes" and \\ and ✓'})
    native, python = _both_ways(monkeypatch, path)
    assert list(native[0]) == list(python[0]) == list(tensors) and native[1] == python[1]
    assert native[1]["note"] == 'with "quotes" and \\ and ✓'
    for key, want in tensors.items():
        got = native[0][key]
        assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == python[0][key].stride()
        assert torch.equal(got, want), key
    storages = {t.untyped_storage().data_ptr() for t in native[0].values() if t.numel()}
    assert len(storages) == len({t.dtype for t in tensors.values() if t.numel()})   # one mapped run a dtype


@pytest.mark.parametrize("header, message", [
    (b'{"__metadata__":{"format":"adapters_core packed"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
     b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "twice"),
    (b'{"__metadata__":{"format":"adapters_core packed"},"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
     "fraction"),
    (b'{"__metadata__":{"format":"adapters_core packed"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}x',
     "after"),
    (b'{"__metadata__":{"format":"adapters_core packed","x":[[[[[[[[[[1]]]]]]]]]]}}', "deeper|not a string"),
    (b'{"__metadata__":{"format":"adapters_core packed"},"a":{"dtype":"F32","shape":[99999999999999999999],'
     b'"data_offsets":[0,4]}}', "int64"),
    (b'{"__metadata__":{"format":"adapters_core packed"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}',
     "ends early"),
    (b'{"__metadata__":{"format":"adapters_core packed","transposed":"[1]"},"a":{"dtype":"F32","shape":[1],'
     b'"data_offsets":[0,4]}}', "non-string"),
    (b'{"__metadata__":{"format":"something else"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
     "not a packed"),
])
def test_the_native_header_reader_refuses_what_no_packed_file_holds(tmp_path, header, message):
    """JSON a packed file never holds is refused with a ValueError naming the file and what is wrong."""
    k = packed_file.sgmv.kernel()
    if k is None:
        pytest.skip("the native kernels are not built here")
    data = torch.frombuffer(bytearray(struct.pack("<Q", len(header)) + header + b"\0" * 4), dtype=torch.uint8)
    with pytest.raises(ValueError, match=message) as caught:
        k.packed_views(data, packed_file.FORMAT, "the-file")
    assert "the-file" in str(caught.value)


def test_a_tensor_before_the_data_section_is_refused_both_ways(tmp_path, monkeypatch):
    """A header whose one tensor starts 4 bytes before the data (inside the header): refused by the kernel's reader
    and by the Python path alike, not read from the header's bytes."""
    header = (b'{"__metadata__":{"format":"adapters_core packed"},'
              b'"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}}    ')
    path = os.path.join(tmp_path, "served.safetensors")
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
    for got in _both_ways(monkeypatch, path):
        assert isinstance(got, ValueError) and "do not fit the file" in str(got)


def test_the_file_is_safetensors_with_aligned_data(tmp_path, packed):
    path = os.path.join(tmp_path, "served.safetensors")
    save_packed(path, packed, {})
    with safe_open(path, framework="pt") as f:
        transposed = set(json.loads(f.metadata()["transposed"]))
        assert transposed == {"m.q.lora_B.weight", "m.v.lora_B.weight", "m.e.lora_embedding_B", "m.k.lora_B"}
        for key, want in packed.items():
            stored = f.get_tensor(key)
            assert torch.equal(stored.T if key in transposed else stored, want), key
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
    assert (8 + header_len) % ALIGN == 0


def test_a_write_into_a_mapped_tensor_stays_in_the_process(tmp_path, packed):
    path = os.path.join(tmp_path, "served.safetensors")
    save_packed(path, packed, {})
    before = open(path, "rb").read()
    got, _ = map_packed(path)
    got["m.q.lora_A.weight"].add_(1.0)
    assert open(path, "rb").read() == before
    assert torch.equal(map_packed(path)[0]["m.q.lora_A.weight"], packed["m.q.lora_A.weight"])


def test_malformed_truncated_and_foreign_files_are_refused(tmp_path, packed):
    path = os.path.join(tmp_path, "served.safetensors")
    save_packed(path, packed, {})
    data = open(path, "rb").read()
    foreign = os.path.join(tmp_path, "plain.safetensors")
    save_file({"a": torch.ones(2)}, foreign)
    for broken in (data[:-2], data[:20], data[:4], b"", b"\xff" * 8 + data[8:], data + b"\0\0",
                   open(foreign, "rb").read()):
        with open(path, "wb") as fh:
            fh.write(broken)
        with pytest.raises(ValueError):
            map_packed(path)
    with pytest.raises(FileNotFoundError):
        map_packed(os.path.join(tmp_path, "missing"))


def _two_tensors_with_b_edited(path: str, key: str, value, extra: bytes = b"") -> None:
    """A packed file of tensors a and b (fp32 [4] each) whose header says `value` for b's `key`, its data
    followed by `extra` bytes."""
    save_packed(path, {"a": torch.ones(4), "b": torch.ones(4)}, {})
    data = open(path, "rb").read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    header["b"][key] = value
    text = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + data[8 + header_len:] + extra)


def test_a_gap_between_tensors_is_refused(tmp_path):
    path = os.path.join(tmp_path, "served.safetensors")
    _two_tensors_with_b_edited(path, "data_offsets", [20, 36], extra=b"\0" * 4)    # b was at [16, 32]
    with pytest.raises(ValueError, match="not where"):
        map_packed(path)


def test_the_source_identity_changes_with_the_file(tmp_path):
    path = os.path.join(tmp_path, "f")
    assert source_identity(path) is None
    open(path, "wb").write(b"one")
    first = source_identity(path)
    os.replace(os.path.join(tmp_path, "f"), os.path.join(tmp_path, "g"))
    open(path, "wb").write(b"two")
    assert source_identity(path) != first


def test_offsets_that_do_not_fit_the_shape_are_refused(tmp_path):
    path = os.path.join(tmp_path, "served.safetensors")
    for key, value, message in (("shape", [2], "do not fit its shape"), ("shape", [-4], "not where"),
                                ("dtype", "Q9", "has dtype")):
        _two_tensors_with_b_edited(path, key, value)              # b: 8 bytes, its offsets say 16 / ...
        with pytest.raises(ValueError, match=message):
            map_packed(path)


def _kernel_populates() -> bool:
    probe = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        probe.madvise(packed_file.MADV_POPULATE_READ)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _mapping_rss(address: int) -> int:
    """Bytes of the mapping that holds `address` resident in this process's page tables (/proc/self/smaps)."""
    with open("/proc/self/smaps") as fh:
        lines = fh.read().splitlines()
    for i, line in enumerate(lines):
        span = line.split(" ")[0]
        if "-" in span and all(c in "0123456789abcdef-" for c in span) and (
                int(span.split("-")[0], 16) <= address < int(span.split("-")[1], 16)):
            rss = next(entry for entry in lines[i + 1:] if entry.startswith("Rss:"))
            return int(rss.split()[1]) * 1024
    raise AssertionError(f"no mapping at {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")
@pytest.mark.parametrize("through", ["held_io", "libc", "mmap"])
def test_the_mapping_is_filled_at_once(tmp_path, monkeypatch, through):
    """A 1 MiB file's pages are in the page tables when map_packed returns, before any tensor is read: with the
    GIL kept where the page cache holds the whole file (`held_io.populate_if_resident`, as here: just written),
    else through libc's madvise (ctypes drops the GIL for the call; here: the held call made to find a page
    missing) where the kernel has MADV_POPULATE_READ, or through `mmap.madvise` when libc is not there."""
    path = os.path.join(tmp_path, "served.safetensors")
    save_packed(path, {"a": torch.ones(64, 4096, dtype=torch.bfloat16), "b": torch.ones(64, 4096)}, {})
    calls, held = [], []
    real, real_held = packed_file.libc_madvise(), packed_file.held_io.populate_if_resident
    if through != "mmap" and (real is None or not packed_file.held_io.available()):
        pytest.skip("libc's madvise is not reachable through ctypes here")

    def spy(address, length, advice):
        calls.append(advice)
        return real(address, length, advice)

    def held_spy(address, length, advice):
        held.append(advice)
        return real_held(address, length, advice) if through == "held_io" else False
    monkeypatch.setattr(packed_file, "libc_madvise", (lambda: spy) if through != "mmap" else (lambda: None))
    monkeypatch.setattr(packed_file.held_io, "populate_if_resident", held_spy)
    got, _ = map_packed(path)
    if not _kernel_populates():
        pytest.skip("this kernel has no MADV_POPULATE_READ (Linux < 5.14): pages fault in on first use")
    if through == "held_io" and calls:                   # (the held call found a page missing)
        pytest.skip("the page cache dropped the file before it was mapped")
    want_held = [packed_file.MADV_POPULATE_READ] if through != "mmap" else []
    assert held[:1] == want_held
    assert calls == ([packed_file.MADV_POPULATE_READ] if through == "libc" else [])
    assert _mapping_rss(got["a"].untyped_storage().data_ptr()) >= os.path.getsize(path) - 4096
    assert torch.equal(got["b"], torch.ones(64, 4096))


@pytest.mark.skipif(not packed_file.held_io.available(), reason="no libc reachable through ctypes here")
def test_mapping_a_cached_file_keeps_the_gil(tmp_path, packed):
    """map_packed of a file in the page cache never lets the GIL go (open, map, fill, header, views): beside a
    busy event loop each give-up cost a loader up to the 5 ms switch interval (a slice and `.view(dtype)` of
    a uint8 tensor did, torch's bindings of view ops let it go; `frombuffer` does not)."""
    if packed_file.sgmv.kernel() is None:
        pytest.skip("the native kernels are not built here (as_strided lets the GIL go)")
    path = os.path.join(tmp_path, "served.safetensors")
    save_packed(path, packed, {"source": "x"})
    kept = []                            # (freeing the mapping lets the GIL go: kept, as a server keeps them)
    assert not lets_the_gil_go(lambda: kept.append(map_packed(path)))
    assert all(torch.equal(kept[-1][0][key], value) for key, value in packed.items())
