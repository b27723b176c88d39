"""`premap` / `map_resident` / `map_packed(path, ahead)`: a packed file mapped and filled on another thread (or,
wholly cached, where it is) is what the reader maps (its tensors live in that mapping, equal to the saved ones),
the fill lets the GIL go (a disk read or the page tables beside the reader's Python: libc's madvise through
ctypes); a file replaced since, a premap that failed and one not done yet are each read past (the reader maps
the file itself and gets the file's current tensors)."""
import ctypes
import mmap
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

from adapters_core import packed_file
from adapters_core.packed_file import map_packed, premap, save_packed

pytestmark = pytest.mark.skipif(not packed_file.can_premap(), reason="premap needs Linux's libc with statx")


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x.lora_A.weight": torch.randn(8, 64, generator=g),
            "x.lora_B.weight": torch.randn(32, 8, generator=g).T.contiguous().T,        # held as Bt [r, out]
            "y.scale": torch.randn(16, generator=g).to(torch.bfloat16)}


def _in_mapping(tensor: torch.Tensor, got: packed_file.Premapped) -> bool:
    return got.address <= tensor.data_ptr() < got.address + len(got.mapped)


def _ahead(path: str) -> Future:
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(premap, path)
    future.exception()                       # (done: the pool was shut down with it)
    return future


def test_the_reader_takes_the_mapping_made_ahead(tmp_path):
    path = str(tmp_path / "served.safetensors")
    saved = _tensors(1)
    save_packed(path, saved, {"source": "s"})
    ahead = _ahead(path)
    got, metadata = map_packed(path, ahead)
    assert metadata["source"] == "s" and list(got) == list(saved)
    for key, value in saved.items():
        assert torch.equal(got[key], value) and got[key].stride() == value.stride()
        assert _in_mapping(got[key], ahead.result())


def test_a_file_replaced_after_it_was_mapped_ahead_is_mapped_again(tmp_path):
    """The served file is rewritten by a rename (a newer version of the stored adapter): the mapping made ahead
    holds the old file, so the reader maps the file now at the path."""
    path = str(tmp_path / "served.safetensors")
    save_packed(path, _tensors(1), {"source": "old"})
    ahead = _ahead(path)
    new = _tensors(2)
    save_packed(path, new, {"source": "new"})
    got, metadata = map_packed(path, ahead)
    assert metadata["source"] == "new"
    assert all(torch.equal(got[key], value) for key, value in new.items())
    assert not _in_mapping(got["x.lora_A.weight"], ahead.result())


def test_a_failed_or_unfinished_premap_is_read_past(tmp_path):
    path = str(tmp_path / "served.safetensors")
    failed = _ahead(path)                                         # no file yet
    assert isinstance(failed.exception(), OSError)
    saved = _tensors(3)
    save_packed(path, saved, {})
    got, _ = map_packed(path, failed)
    assert all(torch.equal(got[key], value) for key, value in saved.items())
    pending = Future()                                            # not begun: cancelled, the reader maps it
    got, _ = map_packed(path, pending)
    assert pending.cancelled() and torch.equal(got["y.scale"], saved["y.scale"])


def test_premap_fills_the_mapping_through_a_call_that_lets_the_gil_go(tmp_path, monkeypatch):
    """The point of a thread ahead: its fill runs beside the reader's Python. It is one `MADV_POPULATE_READ` of
    the whole mapping through libc's madvise as ctypes' CDLL calls it (no FUNCFLAG_PYTHONAPI: the GIL is let go
    for the call). (A check that a thread got the GIL meanwhile missed it now and then on a busy machine: the
    fill of a small cached file ends before a waiting thread is scheduled.)"""
    real = packed_file.libc_madvise()
    assert not real._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    calls = []

    def spy(address, length, advice):
        calls.append((address, length, advice))
        return real(address, length, advice)
    monkeypatch.setattr(packed_file, "libc_madvise", lambda: spy)
    path = str(tmp_path / "served.safetensors")
    save_packed(path, {"a": torch.ones(256, 1024)}, {})
    got = premap(path)
    assert calls[0] == (got.address, len(got.mapped), packed_file.MADV_POPULATE_READ)
    assert calls[1:] in ([], [(got.address, len(got.mapped), mmap.MADV_WILLNEED)])     # (Linux < 5.14: refused)
    assert got.identity == packed_file.held_io.stat_identity(path)
    assert torch.equal(map_packed(path, _done(got))[0]["a"], torch.ones(256, 1024))


def _done(got: packed_file.Premapped) -> Future:
    future = Future()
    future.set_result(got)
    return future


def test_premap_refuses_where_it_cannot_work(tmp_path, monkeypatch):
    monkeypatch.setattr(packed_file, "can_premap", lambda: False)
    with pytest.raises(NotImplementedError):
        premap(str(tmp_path / "x"))


def test_a_file_wholly_in_the_page_cache_is_mapped_where_it_is(tmp_path, monkeypatch):
    """`map_resident`: a file just written (cached) and within the bound comes back mapped and filled, and the
    reader takes that mapping; past the bound, missing, or with a page out of the page cache: None (the caller
    hands the read to a thread)."""
    path = str(tmp_path / "served.safetensors")
    saved = _tensors(3)
    save_packed(path, saved, {"source": "s"})
    got = packed_file.map_resident(path, 1 << 20)
    assert got is not None and got.path == path
    tensors, _ = map_packed(path, got)
    assert all(_in_mapping(tensors[key], got) and torch.equal(tensors[key], want) for key, want in saved.items())
    size = len(got.mapped)
    assert packed_file.map_resident(path, size - 1) is None and packed_file.map_resident(path, size) is not None
    assert packed_file.map_resident(str(tmp_path / "missing"), 1 << 20) is None
    monkeypatch.setattr(packed_file.held_io, "populate_if_resident", lambda address, length, advice: False)
    assert packed_file.map_resident(path, 1 << 20) is None
