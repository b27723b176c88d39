"""Safe extraction of an uploaded adapter archive (`.zip`, `.tar.gz` / `.tgz`, `.tar`).

Every member is checked before a byte is written: it must be a regular file or a directory with a relative
path (no absolute path, drive letter, backslash or `..` part); symlinks, hard links, devices and fifos
refuse the whole archive; the declared uncompressed sizes must add up to at most `max_bytes`, and the
bytes actually read are counted again, so an archive that lies in its headers stops at the same limit.
`max_bytes` is the smaller of `max_archive_bytes` and `max_adapter_bytes`: an archive holds one adapter,
so its expanded members may not exceed what the adapter itself may be (a README next to an adapter right
at the limit must be left out). A compressed tar is decompressed through a counting reader that stops as
soon as the stream passes `max_bytes` plus headroom for tar headers (`TAR_HEADROOM`), before tarfile reads
any data (a pax or long-name header declaring gigabytes is read in one go by tarfile itself).
The PEFT folder may sit at the top level or inside one top-level directory; only its
`adapter_config.json` and weights file are written (flat) into the destination, other members such as
a README are ignored.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Callable

from .errors import Invalid, TooLarge

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
MAX_MEMBERS = 10_000
TAR_HEADROOM = 1 << 20              # tar headers and padding on top of the members' bytes
_CHUNK = 1 << 20


@dataclass
class Member:
    """One regular file of the archive: its normalised path parts, declared size and a way to open it."""

    parts: tuple[str, ...]
    size: int
    open: Callable[[], BinaryIO]


def archive_kind(filename: str) -> str:
    lower = (filename or "").lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lower.endswith(suffix):
            return "zip" if suffix == ".zip" else "tar"
    raise Invalid(f"archive {filename!r} must end in one of {', '.join(ARCHIVE_SUFFIXES)}")


def member_parts(name: str) -> tuple[str, ...]:
    """The path of a member as parts, or Invalid when it could escape the destination."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise Invalid(f"archive member {name!r} has an absolute or unsafe path")
    parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
    if ".." in parts:
        raise Invalid(f"archive member {name!r} has a '..' path component")
    return parts


class _Budget:
    """Counts uncompressed bytes against the limit, declared and actually read."""

    def __init__(self, max_bytes: int, limit_name: str = "max_archive_bytes"):
        self.max_bytes, self.used, self.limit_name = max_bytes, 0, limit_name

    def add(self, n: int) -> None:
        self.used += n
        if self.used > self.max_bytes:
            raise self.too_large()

    def too_large(self) -> TooLarge:
        return TooLarge(f"the archive holds more than {self.max_bytes} bytes uncompressed "
                        f"({self.limit_name}={self.max_bytes})")


class _Bounded(io.RawIOBase):
    """A read-only view of a decompressing stream that refuses to go past `limit` bytes: reads and seeks
    are checked before they are made, so nothing beyond the limit is ever decompressed."""

    def __init__(self, raw, limit: int, budget: _Budget):
        self.raw, self.limit, self.budget, self.pos = raw, limit, budget, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.pos + offset if whence == io.SEEK_CUR else None
        if target is None:
            raise OSError("a compressed archive cannot be seeked from its end")
        if target > self.limit:
            raise self.budget.too_large()
        self.pos = self.raw.seek(target)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        want = self.limit - self.pos + 1 if n is None or n < 0 else n
        if self.pos + want > self.limit:       # would pass the limit: read one byte past it, no more
            want = self.limit - self.pos + 1
        data = self.raw.read(want)
        self.pos += len(data)
        if self.pos > self.limit:
            raise self.budget.too_large()
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _tar_stream(data: bytes, budget: _Budget):
    """The tar bytes of `data`: as is, or decompressed (gzip, bzip2, xz) through a `_Bounded` reader."""
    raw = io.BytesIO(data)
    opener = (gzip.GzipFile if data[:2] == b"\x1f\x8b" else bz2.BZ2File if data[:3] == b"BZh"
              else lzma.LZMAFile if data[:6] == b"\xfd7zXZ\x00" else None)
    if opener is None:
        return raw
    stream = opener(fileobj=raw) if opener is gzip.GzipFile else opener(raw)
    return _Bounded(stream, budget.max_bytes + TAR_HEADROOM, budget)


def _zip_members(data: bytes, budget: _Budget) -> list[Member]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise Invalid(f"the upload is not a valid zip archive: {exc}", status=400) from exc
    if len(infos) > MAX_MEMBERS:
        raise Invalid(f"the archive has {len(infos)} members (at most {MAX_MEMBERS})")
    members = []
    for info in infos:
        parts = member_parts(info.filename)
        mode = stat.S_IFMT(info.external_attr >> 16)
        if info.is_dir():
            if mode not in (0, stat.S_IFDIR):
                raise Invalid(f"archive member {info.filename!r} is not a regular file or directory")
            continue
        if mode not in (0, stat.S_IFREG):
            what = "a symlink" if mode == stat.S_IFLNK else "not a regular file"
            raise Invalid(f"archive member {info.filename!r} is {what}")
        if info.flag_bits & 0x1:
            raise Invalid(f"archive member {info.filename!r} is encrypted")
        budget.add(info.file_size)
        if parts:
            members.append(Member(parts, info.file_size, lambda info=info: archive.open(info)))
    return members


def _tar_members(data: bytes, budget: _Budget) -> list[Member]:
    try:
        archive = tarfile.open(fileobj=_tar_stream(data, budget), mode="r:")
    except (tarfile.TarError, OSError, EOFError, *zlib_errors()) as exc:
        raise Invalid(f"the upload is not a valid tar archive: {exc}", status=400) from exc
    members, count = [], 0
    try:
        # One member at a time, so a declared size over the limit stops before the rest is decompressed.
        while (info := archive.next()) is not None:
            count += 1
            if count > MAX_MEMBERS:
                raise Invalid(f"the archive has more than {MAX_MEMBERS} members")
            parts = member_parts(info.name)
            if info.isdir():
                continue
            if not info.isreg():
                what = ("a symlink" if info.issym() else "a hard link" if info.islnk()
                        else "a device or fifo" if info.isdev() else "not a regular file")
                raise Invalid(f"archive member {info.name!r} is {what}")
            budget.add(info.size)
            if parts:
                members.append(Member(parts, info.size, lambda info=info: archive.extractfile(info)))
    except (tarfile.TarError, OSError, EOFError, *zlib_errors()) as exc:
        raise Invalid(f"the upload is not a valid tar archive: {exc}", status=400) from exc
    return members


def zlib_errors() -> tuple:
    """What the decompressors raise on corrupt input (besides OSError / EOFError)."""
    return (zlib.error, lzma.LZMAError)


def _peft_folder(members: list[Member]) -> dict[str, Member]:
    """The members of the PEFT folder (top level, or the one top-level directory holding a config)."""
    by_path = {m.parts: m for m in members}
    prefixes = [m.parts[:-1] for m in members if m.parts[-1] == CONFIG_NAME and len(m.parts) <= 2]
    if () in prefixes:
        prefix = ()
    elif len(prefixes) == 1:
        prefix = prefixes[0]
    elif not prefixes:
        raise Invalid(f"the archive has no {CONFIG_NAME} at its top level or in one top-level folder")
    else:
        raise Invalid(f"the archive has several adapter folders ({', '.join(p[0] for p in prefixes)}); "
                      f"upload one adapter per archive")
    found = {CONFIG_NAME: by_path[prefix + (CONFIG_NAME,)]}
    for name in WEIGHT_NAMES:
        if prefix + (name,) in by_path:
            found[name] = by_path[prefix + (name,)]
            break
    else:
        raise Invalid(f"the archive's adapter folder has no {' or '.join(WEIGHT_NAMES)}")
    return found


def _copy(member: Member, destination: str, budget: _Budget) -> None:
    written = 0
    try:
        source = member.open()
        with source, open(destination, "wb") as out:
            while chunk := source.read(_CHUNK):
                written += len(chunk)
                if written > member.size:
                    raise Invalid(f"archive member {'/'.join(member.parts)!r} is larger than its header says")
                budget.add(len(chunk))
                out.write(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError, *zlib_errors()) as exc:
        raise Invalid(f"archive member {'/'.join(member.parts)!r} cannot be read: {exc}", status=400) from exc


def extract_archive(data: bytes, filename: str, destination: str, max_bytes: int,
                    max_adapter_bytes: int | None = None) -> list[str]:
    """Check `data` (named `filename`), then write its PEFT files flat into `destination`; return their names.
    Members are counted against the smaller of `max_bytes` (max_archive_bytes) and `max_adapter_bytes`."""
    if len(data) > max_bytes:
        raise TooLarge(f"the archive is {len(data)} bytes; the limit is {max_bytes} (max_archive_bytes)")
    kind = archive_kind(filename)
    limit, limit_name = max_bytes, "max_archive_bytes"
    if max_adapter_bytes is not None and max_adapter_bytes < max_bytes:
        limit, limit_name = max_adapter_bytes, "max_adapter_bytes"
    declared = _Budget(limit, limit_name)
    members = _zip_members(data, declared) if kind == "zip" else _tar_members(data, declared)
    wanted = _peft_folder(members)
    read = _Budget(limit, limit_name)
    for name, member in wanted.items():
        _copy(member, os.path.join(destination, name), read)
    return list(wanted)

