"""`held_io`: file calls that keep the GIL (an adapter loader's open, read, map and stat beside a busy server),
each giving what Python's own call gives; and that they do keep it: with the switch interval made huge, a
thread waiting for the GIL runs only when the caller lets it go, which a sleep does and these do not."""
import ctypes
import errno
import mmap
import os
import subprocess
import sys
import time

import pytest
import torch

from adapters_core import held_io, packed_file, sgmv
from gil_check import lets_the_gil_go

pytestmark = pytest.mark.skipif(not held_io.available(), reason="no libc reachable through ctypes here")


def test_read_file_reads_the_whole_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b'{"r": 8}' * 1000)
    assert held_io.read_file(str(path), 1 << 20) == path.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    assert held_io.read_file(str(tmp_path / "empty"), 10) == b""


def test_read_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        held_io.read_file(str(tmp_path / "missing"), 10)
    (tmp_path / "big").write_bytes(b"x" * 11)
    with pytest.raises(OSError, match="larger than 10 bytes") as info:
        held_io.read_file(str(tmp_path / "big"), 10)
    assert info.value.errno == errno.EFBIG
    with pytest.raises(IsADirectoryError):
        held_io.read_file(str(tmp_path), 10)


def test_a_fifo_is_refused_at_once(tmp_path):
    """A FIFO where a file should be (a hostile or broken store) is an error, not a wait for a writer with the
    GIL held (the whole server stopped). In a child process, so a regression fails on its timeout."""
    fifo = tmp_path / "adapter_config.json"
    os.mkfifo(fifo)
    script = ("import errno, sys\nfrom adapters_core import held_io\n"
              "for fn in (lambda p: held_io.read_file(p, 100), held_io.map_private):\n"
              "    try:\n        fn(sys.argv[1])\n    except OSError as exc:\n        print(exc.errno)\n")
    done = subprocess.run([sys.executable, "-c", script, str(fifo)], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(errno.ESPIPE)] * 2


def test_map_private_maps_the_file_and_keeps_writes_to_itself(tmp_path):
    path = tmp_path / "served.safetensors"
    data = bytes(range(256)) * 64
    path.write_bytes(data)
    array, address = held_io.map_private(str(path))
    assert address != 0 and bytes(array) == data
    tensor = torch.frombuffer(array, dtype=torch.uint8)          # holds the mapping
    del array
    tensor[:4] = 7                                               # private: the file is not written
    assert path.read_bytes() == data and tensor[:4].tolist() == [7] * 4 and tensor[4].item() == 4
    (tmp_path / "empty").write_bytes(b"")
    assert len(held_io.map_private(str(tmp_path / "empty"))[0]) == 0
    with pytest.raises(FileNotFoundError):
        held_io.map_private(str(tmp_path / "missing"))


def test_stat_identity_is_what_os_stat_gives(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"1234")
    os.symlink(path, tmp_path / "link")
    try:
        got = held_io.stat_identity(str(path))
    except NotImplementedError:
        pytest.skip("no statx in this libc")
    st = os.stat(path)
    assert got == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert held_io.stat_identity(str(tmp_path / "link")) == got                # links followed, as os.stat
    assert held_io.stat_identity(str(tmp_path / "missing")) is None
    assert packed_file.source_identity(str(path)) == ":".join(map(str, got))


def test_the_calls_keep_the_gil(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b"{}" * 100)
    packed = str(tmp_path / "served.safetensors")
    packed_file.save_packed(packed, {"m.lora_A.weight": torch.ones(4, 8), "m.lora_B.weight": torch.ones(8, 4)}, {})

    assert lets_the_gil_go(lambda: time.sleep(0.002))    # the check can fail (a call that lets the GIL go)
    assert not lets_the_gil_go(lambda: held_io.read_file(str(path), 1 << 20))
    assert not lets_the_gil_go(lambda: held_io.map_private(packed))
    try:
        held_io.stat_identity(str(path))
    except NotImplementedError:
        return
    assert not lets_the_gil_go(lambda: held_io.stat_identity(str(path)))


def _cached_mapping(tmp_path):
    """(a ctypes array over a mapped 1 MiB packed file just written, so in the page cache; its address)."""
    path = str(tmp_path / "served.safetensors")
    packed_file.save_packed(path, {"a": torch.ones(64, 4096, dtype=torch.bfloat16), "b": torch.ones(64, 4096)}, {})
    return path, held_io.map_private(path)


def test_populate_if_resident_fills_a_cached_mapping_with_the_gil_kept(tmp_path):
    """A mapping of a file the page cache holds is filled (`madvise`) without letting the GIL go: its pages
    are then in the process's page tables (/proc/self/smaps' Rss), before anything reads them."""
    path, (array, address) = _cached_mapping(tmp_path)
    advice = packed_file.MADV_POPULATE_READ
    if not held_io.populate_if_resident(address, len(array), advice):
        pytest.skip("this kernel refused MADV_POPULATE_READ (Linux < 5.14), or the page cache dropped the file")
    if os.path.exists("/proc/self/smaps"):
        from test_packed_file import _mapping_rss
        assert _mapping_rss(address) >= os.path.getsize(path) - 4096
    more = []
    assert not lets_the_gil_go(lambda: more.append(held_io.map_private(path)))
    assert not lets_the_gil_go(lambda: held_io.populate_if_resident(more[-1][1], len(more[-1][0]), advice))
    assert held_io.populate_if_resident(address, 0, advice) is False          # nothing to fill: nothing done


def test_populate_if_resident_leaves_a_file_not_in_the_page_cache_to_the_caller(tmp_path):
    """A file whose pages left the page cache is not filled here (the caller lets the GIL go for the disk)."""
    path, (array, address) = _cached_mapping(tmp_path)
    del array
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # clean pages dropped (not on every file system)
    finally:
        os.close(fd)
    array, address = held_io.map_private(path)
    page = mmap.PAGESIZE
    vector = (ctypes.c_ubyte * ((len(array) + page - 1) // page))()
    if ctypes.CDLL(None).mincore(ctypes.c_void_p(address), ctypes.c_size_t(len(array)), vector) != 0 or all(vector):
        pytest.skip("the page cache kept the file (tmpfs, or fadvise ignored here)")
    assert held_io.populate_if_resident(address, len(array), packed_file.MADV_POPULATE_READ) is False
