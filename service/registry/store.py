"""`AdapterStore`: the registry's directory of adapters, written so that a crash never leaves half an adapter.

Layout: `<root>/<name>/adapter_config.json`, `adapter_model.safetensors` and `registry.json` (source, created_at,
pinned, served, sha256, size, the weights file's identity when it was hashed), and, once a CPU server has loaded
it, `served.<adapter dtype>.safetensors`: its tensors as the server holds them, which later loads map instead of
reading the PEFT file (`read_served`; a cache: made from the folder's own file, written whole or not at all,
ignored when that file changed). A new adapter is built in `<root>/.tmp-<uuid>/`, sealed (every file and the
folder fsynced) and renamed into place in one `os.rename`; replacing first renames the old folder to
`.trash-<uuid>.<name>` and, once the new one is in place, drops the name from the trash, so only a crash between
those two renames finds a named trash and no `<name>`; deleting renames to `.trash-<uuid>` before removing. So
after a crash every `<name>` folder is complete, and `clean()` at start-up removes whatever `.tmp-*` / `.trash-*`
/ half-written `registry.json` or `served.*` file was left (putting a replaced folder back if the crash came
between a replace's renames). Every rename is followed by an fsync of the folder that holds it, so the order
survives a power cut too, not only a killed process. Renames are quick and are called from the event loop, so they
are ordered with the registry's bookkeeping; copying, hashing and removing trees are slow and run in worker
threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import adapters_core as ac
from adapters_core import held_io
from adapters_core.config import CONFIG_NAME
from adapters_core.io import BIN_NAME, SAFETENSORS_NAME
from adapters_core.packed_file import Premapped, map_packed, save_packed, source_identity
from adapters_core.packed_read import read_packed_safetensors

from .errors import Invalid, NotFound, TooLarge

META_NAME = "registry.json"
TMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"
META_TMP_SUFFIX = ".tmp"                # registry.json.<uuid>.tmp: a metadata rewrite not yet renamed over
SERVED_PREFIX = "served."               # served.<adapter dtype>.safetensors: the tensors as held (read_served)
MAX_CONFIG_READ = 64 << 20              # a stored adapter_config.json past this is not read (PEFT's are ~1-4 KB)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def keys_digest(tensors: dict) -> str:
    """A digest of the tensors' names: a served file records the one of what it was written with, and a file
    holding other tensors (cut short, emptied or written over by hand with its metadata kept) is not used."""
    return hashlib.sha1("\n".join(sorted(tensors)).encode()).hexdigest()


class AdapterStore:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    # ----- staging ----------------------------------------------------------------------------------------
    def new_staging(self) -> str:
        staging = os.path.join(self.root, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        os.mkdir(staging)
        return staging

    def stage_bytes(self, staging: str, config: bytes, weights: bytes, weights_filename: str,
                    max_bytes: int) -> None:
        if len(config) + len(weights) > max_bytes:
            raise TooLarge(f"the adapter is {len(config) + len(weights)} bytes; the limit is {max_bytes} "
                           f"(max_adapter_bytes)")
        lower = os.path.basename(weights_filename or "").lower()
        if lower.endswith(".safetensors"):
            name = SAFETENSORS_NAME
        elif lower.endswith(".bin"):
            name = BIN_NAME
        else:
            raise Invalid(f"weights file {weights_filename!r} must be .safetensors (or .bin)")
        _write(os.path.join(staging, CONFIG_NAME), config)
        _write(os.path.join(staging, name), weights)

    def stage_folder(self, staging: str, source: str, max_bytes: int) -> None:
        """Copy a PEFT folder's config and weights (safetensors preferred) into `staging`."""
        if not os.path.isdir(source):
            raise NotFound(f"adapter folder {source!r} does not exist")
        weights = next((n for n in (SAFETENSORS_NAME, BIN_NAME) if os.path.isfile(os.path.join(source, n))), None)
        if not os.path.isfile(os.path.join(source, CONFIG_NAME)) or weights is None:
            raise Invalid(f"{source!r} is not a PEFT adapter folder: it needs {CONFIG_NAME} and {SAFETENSORS_NAME}")
        size = sum(os.path.getsize(os.path.join(source, n)) for n in (CONFIG_NAME, weights))
        if size > max_bytes:
            raise TooLarge(f"the adapter is {size} bytes; the limit is {max_bytes} (max_adapter_bytes)")
        for name in (CONFIG_NAME, weights):
            shutil.copyfile(os.path.join(source, name), os.path.join(staging, name))   # follows hub-cache links
            with open(os.path.join(staging, name), "rb+") as fh:
                os.fsync(fh.fileno())

    def to_safetensors(self, staging: str, tensors: dict[str, torch.Tensor]) -> None:
        """Replace a staged `.bin` by the same tensors as safetensors: the store holds one format only."""
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()},
                  os.path.join(staging, SAFETENSORS_NAME), metadata={"format": "pt"})
        os.remove(os.path.join(staging, BIN_NAME))

    def digest(self, folder: str) -> dict[str, Any]:
        """What `registry.json` says of the stored files: `sha256` of the weights file, `size` of config +
        weights in bytes, and `weights_file`, the weights file's identity taken before it was hashed (a file
        changed meanwhile then differs from it, and is hashed again at the next scan)."""
        identity = self.weights_identity(folder)
        sha = hashlib.sha256()
        with open(os.path.join(folder, SAFETENSORS_NAME), "rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
        return {"sha256": sha.hexdigest(), "size": self.size(folder), "weights_file": identity}

    @staticmethod
    def weights_identity(folder: str) -> str:
        """The stored weights file's inode, size, modification and change times (ns): a scan or rescan hashes
        the file again only when these differ from the ones `registry.json` recorded with its sha256, so a file
        edited in place or renamed over is noticed without hashing every file each time. Without the device
        number: replicas mounting one store (NFS) may see one file under different ones."""
        st = os.stat(os.path.join(folder, SAFETENSORS_NAME))
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    @staticmethod
    def config_digest(config_bytes: bytes) -> str:
        """The stored config's sha256: a rescan compares it with the record's (the config is read anyway)."""
        return hashlib.sha256(config_bytes).hexdigest()

    def size(self, folder: str) -> int:
        return sum(os.path.getsize(os.path.join(folder, n)) for n in (CONFIG_NAME, SAFETENSORS_NAME))

    # ----- metadata ---------------------------------------------------------------------------------------
    def write_meta(self, folder: str, meta: dict[str, Any]) -> None:
        """Replace `registry.json` atomically (write aside, then rename over)."""
        tmp = os.path.join(folder, f"{META_NAME}.{uuid.uuid4().hex}{META_TMP_SUFFIX}")
        _write(tmp, json.dumps(meta, indent=2, sort_keys=True).encode())
        os.replace(tmp, os.path.join(folder, META_NAME))
        _fsync_dir(folder)

    def read_meta(self, folder: str) -> Optional[dict[str, Any]]:
        try:
            with open(os.path.join(folder, META_NAME), encoding="utf-8") as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise Invalid(f"{folder}/{META_NAME} is unreadable: {exc}") from exc
        if not isinstance(meta, dict):
            raise Invalid(f"{folder}/{META_NAME} is not a JSON object")
        return meta

    def read_config(self, folder: str) -> bytes:
        """The stored config's bytes; on a loader thread with the GIL kept where possible (`held_io`: Python's
        open, reads and close each waited up to 5 ms for it beside a busy event loop)."""
        path = os.path.join(folder, CONFIG_NAME)
        if held_io.available():
            return held_io.read_file(path, MAX_CONFIG_READ)
        with open(path, "rb") as fh:
            return fh.read()

    def read_tensors(self, folder: str) -> dict[str, torch.Tensor]:
        try:
            return ac.read_adapter_weights(folder)
        except ac.AdapterError as exc:
            raise Invalid(f"stored adapter {os.path.basename(folder)!r}: {exc}") from exc

    def read_packed(self, folder: str, factor_dtype: Optional[torch.dtype],
                    skip: Optional[Callable[[str], bool]] = None) -> Optional[tuple[dict, int]]:
        """The stored safetensors file read straight into packed buffers (`read_packed_safetensors`: its
        tensors but those `skip` accepts, and their bytes in the file), or None where that reader does not
        apply (a `.bin`, an unusual dtype): the caller reads and packs the general way."""
        path = os.path.join(folder, SAFETENSORS_NAME)
        if not os.path.isfile(path):
            return None
        try:
            return read_packed_safetensors(path, factor_dtype, skip)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise Invalid(f"stored adapter {os.path.basename(folder)!r}: {SAFETENSORS_NAME} is unreadable or "
                          f"truncated: {exc}") from exc

    # ----- the served layout, kept beside the files ---------------------------------------------------------
    @staticmethod
    def served_path(folder: str, factor_dtype: Optional[torch.dtype]) -> str:
        held = str(factor_dtype).removeprefix("torch.") if factor_dtype is not None else "auto"
        return os.path.join(folder, f"{SERVED_PREFIX}{held}.safetensors")

    @staticmethod
    def source(folder: str) -> Optional[str]:
        """The stored safetensors file's identity (`packed_file.source_identity`), None when it has none."""
        return source_identity(os.path.join(folder, SAFETENSORS_NAME))

    def read_served(self, folder: str, factor_dtype: Optional[torch.dtype],
                    ahead: Union[Future, Premapped, None] = None) -> Optional[tuple[dict, int]]:
        """The adapter's tensors as `read_packed` gives them for `factor_dtype`, mapped from the file
        `write_served` made of them (no copy), and the bytes of the stored file's weights; None when there is
        no such file or it was made from another version of the stored file (or cannot be read: the caller
        reads the stored file, and writes this one again). `ahead`: that file mapped already, or ahead on
        another thread (`map_packed`'s)."""
        try:
            tensors, metadata = map_packed(self.served_path(folder, factor_dtype), ahead)
            if metadata.get("source") != self.source(folder) or metadata.get("keys") != keys_digest(tensors):
                return None               # another version's, or not the tensors it was written with
            return tensors, int(metadata["file_bytes"])
        except Exception:                 # a cache: whatever is wrong with it, the stored file is read instead
            return None

    def write_served(self, folder: str, factor_dtype: Optional[torch.dtype], tensors: dict, file_bytes: int,
                     source: str) -> bool:
        """Worker thread: keep `tensors` (read from the stored file whose identity was `source`, checked, as
        held for `factor_dtype`) in the served layout beside the stored files, unless that file changed since
        it was read or the folder cannot be written (a read-only store: loads then always read the files).
        Whether it wrote."""
        if self.source(folder) != source:
            return False
        try:
            save_packed(self.served_path(folder, factor_dtype), tensors,
                        {"source": source, "file_bytes": str(file_bytes), "keys": keys_digest(tensors)})
        except OSError:
            return False
        return True

    # ----- moving folders -----------------------------------------------------------------------------------
    def seal(self, staging: str) -> None:
        """Worker thread: fsync every staged file and the staging folder, so the rename that publishes it
        never publishes data still only in the page cache (whichever way the files were written)."""
        for entry in os.listdir(staging):
            with open(os.path.join(staging, entry), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(staging)

    def commit(self, name: str, staging: str) -> Optional[str]:
        """Move `staging` to `<root>/<name>`; an existing folder goes to the trash first (returned). The
        trash of a replace keeps the name until the new folder is in place, so a crash between the two
        renames loses nothing (see clean); then the name is dropped, so that trash can never come back
        later, e.g. when `<name>` is deleted before the trash is removed and the process dies."""
        trash = self.trash(name, keep_name=True)
        os.rename(staging, self.path(name))
        if trash is not None:
            unnamed = trash[:trash.rindex(f".{name}")]
            os.rename(trash, unnamed)
            trash = unnamed
        _fsync_dir(self.root)
        return trash

    def trash(self, name: str, keep_name: bool = False) -> Optional[str]:
        """Rename `<root>/<name>` out of the way; return the trash path, or None when there was no folder."""
        suffix = f".{name}" if keep_name else ""
        trash = os.path.join(self.root, f"{TRASH_PREFIX}{uuid.uuid4().hex}{suffix}")
        try:
            os.rename(self.path(name), trash)
        except FileNotFoundError:
            return None
        _fsync_dir(self.root)
        return trash

    @staticmethod
    def remove(path: Optional[str]) -> None:
        if path:
            shutil.rmtree(path, ignore_errors=True)

    def clean(self) -> list[str]:
        """Remove `.tmp-*` and `.trash-*` leftovers of a crash and half-written `registry.json` rewrites;
        return what was removed. A replaced folder whose name is empty (the crash fell between a replace's
        two renames) is put back instead."""
        removed = []
        for entry in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, entry)
            if entry.startswith(TRASH_PREFIX) and "." in entry[len(TRASH_PREFIX):]:
                name = entry[len(TRASH_PREFIX):].split(".", 1)[1]
                if not os.path.exists(self.path(name)) and self._complete(path):
                    os.rename(path, self.path(name))
                    _fsync_dir(self.root)
                    continue
            if entry.startswith((TMP_PREFIX, TRASH_PREFIX)):
                self.remove(path)
                removed.append(entry)
            elif os.path.isdir(path):
                for inner in os.listdir(path):
                    if inner.startswith((f"{META_NAME}.", SERVED_PREFIX)) and inner.endswith(META_TMP_SUFFIX):
                        try:
                            os.remove(os.path.join(path, inner))
                        except FileNotFoundError:   # renamed into place meanwhile by a writer still running
                            continue                # (another server on this store, or a registry reopened)
                        removed.append(f"{entry}/{inner}")
        return removed

    @staticmethod
    def _complete(folder: str) -> bool:
        return all(os.path.isfile(os.path.join(folder, n)) for n in (CONFIG_NAME, SAFETENSORS_NAME, META_NAME))

    def names(self) -> list[str]:
        """Folders that look like complete adapters (config and safetensors present), sorted."""
        out = []
        for entry in sorted(os.listdir(self.root)):
            folder = self.path(entry)
            if entry.startswith(".") or not os.path.isdir(folder):
                continue
            if os.path.isfile(os.path.join(folder, CONFIG_NAME)) and \
                    os.path.isfile(os.path.join(folder, SAFETENSORS_NAME)):
                out.append(entry)
        return out
