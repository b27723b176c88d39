"""File calls that keep the GIL: open, read, map and close through libc with ctypes' `PyDLL`, which does not
release the GIL around the call, unlike Python's own file functions.

Each blocking call in CPython (`open`, `os.read`, `os.close`, `mmap.mmap`, `os.stat`) lets the GIL go and takes
it back after. A thread that gives it up while another thread runs Python waits for that thread's next forced
switch, up to `sys.getswitchinterval()` (5 ms) per call. A server's adapter loader makes about ten such calls
per load (the config's open, reads and close, the packed file's open, fstat, mmap and close), and beside an
event loop handling a burst of requests each one cost up to 5 ms: measured in one process on the 2-core Zen 5,
one thread running Python beside the loader took a mapped load from 1.2 ms to 123-148 ms, 80 ms of it in the
mapping's calls and 12 ms in the config's. These calls on files in the page cache take microseconds, so
keeping the GIL through them costs the other threads less than giving it away costs the loader. Filling a
mapping's page tables (`populate_if_resident`) keeps it only when `mincore` finds every page in the page cache;
where it might wait for a disk the caller lets the GIL go (`packed_file._populate`).

Linux and other POSIX systems with a findable libc (`stat_identity` needs glibc's statx, 2.28 or later);
elsewhere `available()` is False and callers use Python's functions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import weakref
from typing import Optional


@functools.cache
def _libc() -> Optional[ctypes.PyDLL]:
    try:
        libc = ctypes.PyDLL(ctypes.util.find_library("c") or None, use_errno=True)
        signatures = {"open": ([ctypes.c_char_p, ctypes.c_int], ctypes.c_int),
                      "read": ([ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_ssize_t),
                      "close": ([ctypes.c_int], ctypes.c_int),
                      "lseek": ([ctypes.c_int, ctypes.c_long, ctypes.c_int], ctypes.c_long),
                      "mmap": ([ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                ctypes.c_long], ctypes.c_void_p),
                      "munmap": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int),
                      "mincore": ([ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], ctypes.c_int),
                      "madvise": ([ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int)}
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(libc, name)
            fn.argtypes, fn.restype = argtypes, restype
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def _statx():
    """libc's statx (glibc >= 2.28), or None."""
    libc = _libc()
    fn = getattr(libc, "statx", None) if libc is not None else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    return fn


class _Timestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    """The kernel's `struct statx` (linux/stat.h: the same layout on every architecture), 256 bytes."""
    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32), ("attributes", ctypes.c_uint64),
                ("nlink", ctypes.c_uint32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64),
                ("size", ctypes.c_uint64), ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _Timestamp), ("btime", _Timestamp), ("ctime", _Timestamp), ("mtime", _Timestamp),
                ("rdev_major", ctypes.c_uint32), ("rdev_minor", ctypes.c_uint32),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32), ("spare", ctypes.c_uint64 * 14)]


_AT_FDCWD = -100
_STATX_BASIC_STATS = 0x7FF


def available() -> bool:
    """Whether these calls can be made here (else use Python's)."""
    return os.name == "posix" and _libc() is not None


def _raise(path: str) -> None:
    code = ctypes.get_errno() or errno.EIO
    raise OSError(code, os.strerror(code), path)


def _open(libc: ctypes.PyDLL, path: str) -> int:
    """Opened for reading without blocking: a FIFO put where a file should be would otherwise wait for a writer
    with the GIL held, the whole process with it (its size then cannot be found: ESPIPE)."""
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    while True:
        fd = libc.open(os.fsencode(path), flags)
        if fd >= 0:
            return fd
        if ctypes.get_errno() != errno.EINTR:
            _raise(path)


def read_file(path: str, limit: int) -> bytes:
    """The whole file (at most `limit` bytes: past that, OSError EFBIG), read with the GIL held."""
    libc = _libc()
    fd = _open(libc, path)
    try:
        if libc.read(fd, None, 0) < 0:                          # a directory: EISDIR, as Python's open says
            _raise(path)
        size = libc.lseek(fd, 0, os.SEEK_END)
        if size < 0 or libc.lseek(fd, 0, os.SEEK_SET) < 0:
            _raise(path)
        if size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        buffer = ctypes.create_string_buffer(size + 1)          # one byte more: a file that grew is noticed
        done = 0
        while done <= size:
            n = libc.read(fd, ctypes.byref(buffer, done), size + 1 - done)
            if n < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                _raise(path)
            if n == 0:
                break
            done += n
        if done > size:
            raise OSError(errno.EFBIG, "the file grew while it was read", path)
        return buffer.raw[:done]
    finally:
        libc.close(fd)


def map_private(path: str) -> tuple[ctypes.Array, int]:
    """The file mapped private and writable (as `mmap.mmap(fd, 0, MAP_PRIVATE, PROT_READ | PROT_WRITE)`), with
    the GIL held: (a ctypes byte array over the mapping, its address). The mapping is unmapped when the array
    is collected (a `torch.frombuffer` of it holds it). An empty file gives an empty array and address 0."""
    libc = _libc()
    fd = _open(libc, path)
    try:
        size = libc.lseek(fd, 0, os.SEEK_END)
        if size < 0:
            _raise(path)
        if size == 0:
            return (ctypes.c_ubyte * 0)(), 0
        address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            _raise(path)
    finally:
        libc.close(fd)
    array = (ctypes.c_ubyte * size).from_address(address)
    weakref.finalize(array, libc.munmap, address, size)
    return array, address


def stat_identity(path: str) -> Optional[tuple[int, int, int, int, int]]:
    """(device, inode, size, modification and change times in ns) of `path` as `os.stat` gives them (links
    followed: st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), through statx with the GIL held; None when
    the file is missing or cannot be stat'ed. Raises NotImplementedError where there is no statx (the caller
    uses os.stat)."""
    statx = _statx()
    if statx is None:
        raise NotImplementedError("no statx here")
    buf = _Statx()
    while statx(_AT_FDCWD, os.fsencode(path), 0, _STATX_BASIC_STATS, ctypes.byref(buf)) != 0:
        if ctypes.get_errno() != errno.EINTR:
            return None
    return (os.makedev(buf.dev_major, buf.dev_minor), buf.ino, buf.size,
            buf.mtime.tv_sec * 1_000_000_000 + buf.mtime.tv_nsec,
            buf.ctime.tv_sec * 1_000_000_000 + buf.ctime.tv_nsec)


def populate_if_resident(address: int, length: int, advice: int) -> bool:
    """`madvise(address, length, advice)` with the GIL held, when every page of the page-aligned mapping at
    `address` is already in the page cache (`mincore`): filling page tables of cached pages takes microseconds
    (~0.1 ms for a 4.5 MiB adapter), where letting the GIL go beside a thread running Python costs up to the
    5 ms switch interval. Whether it did: False (nothing done) when some page is not cached, so the caller
    lets the GIL go for the disk read, or when either call fails here (the caller's own call says why)."""
    libc = _libc()
    if libc is None or length <= 0:
        return False
    page = mmap.PAGESIZE
    pages = (length + page - 1) // page
    vector = ctypes.create_string_buffer(pages)                 # [pages] bytes: bit 0 = the page is resident
    if libc.mincore(address, length, vector) != 0:
        return False
    if b"\0" in vector.raw[:pages]:                             # (the other bits are reserved: zero)
        return False
    return libc.madvise(address, length, advice) == 0
