"""Archive uploads are stopped by `max_adapter_bytes` before extraction (round 2, finding 10), over HTTP.

With `max_adapter_bytes` 1 MiB: a small zip whose weights member declares 64 MiB, and a tar.gz holding a
64 MiB member, get 413 naming `max_adapter_bytes` without a byte of any member written to staging (no
member copy starts) and, for the tar.gz, with at most the limit plus tar headroom decompressed; a tar.gz
whose pax header alone expands to 64 MiB (tarfile reads such a header in one go) is stopped the same way.
The store and the listing are unchanged, and a normal archive of the same adapter is still accepted.
"""
from __future__ import annotations

import gzip
import io
import tarfile
import zipfile

import httpx
import pytest

import service.registry.archive as archive_mod
from _rel_live import CONFIG, T, WEIGHTS, listing, live_server
from _rel_tiny import make_adapter, tree

LIMIT = 2**20
BIG = 64 * 2**20


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _tgz(files: dict[str, bytes], pax: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:
                info.pax_headers = pax
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def spies(monkeypatch):
    seen = {"copies": 0, "gunzipped": 0}
    copy, read = archive_mod._copy, gzip.GzipFile.read

    def counting_copy(*args, **kw):
        seen["copies"] += 1
        return copy(*args, **kw)

    def counting_read(self, size=-1):
        data = read(self, size)
        seen["gunzipped"] += len(data)
        return data

    monkeypatch.setattr(archive_mod, "_copy", counting_copy)
    monkeypatch.setattr(gzip.GzipFile, "read", counting_read)
    return seen


def test_declared_and_streamed_sizes_stop_before_extraction(tmp_path, spies):
    folder = make_adapter(tmp_path / "a", seed=3)
    good = {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: (folder / WEIGHTS).read_bytes()}
    zeros = b"\0" * BIG
    cases = {
        "zip.zip": _zip({CONFIG: good[CONFIG], WEIGHTS: zeros}),
        "tar.tar.gz": _tgz({CONFIG: good[CONFIG], WEIGHTS: zeros}),
        "readme.tar.gz": _tgz({"README.md": zeros, **good}),
        "pax.tar.gz": _tgz(good, pax={"comment": "x" * BIG}),
    }
    with live_server(tmp_path / "store", max_adapter_bytes=LIMIT) as live:
        for filename, data in cases.items():
            assert len(data) < LIMIT                    # small uploads that expand far past the limit
            before_list, before_tree = listing(live.url), tree(live.store)
            spies.update(copies=0, gunzipped=0)
            r = httpx.post(f"{live.url}/admin/adapters", data={"name": "big"}, files={"archive": (filename, data)},
                           timeout=T)
            assert r.status_code == 413, (filename, r.text)
            assert "max_adapter_bytes" in r.json()["error"]["message"], (filename, r.text)
            assert spies["copies"] == 0, filename         # refused before any member was extracted
            assert spies["gunzipped"] <= LIMIT + archive_mod.TAR_HEADROOM + 2**16, (filename, spies)
            assert listing(live.url) == before_list and tree(live.store) == before_tree
        r = httpx.post(f"{live.url}/admin/adapters", data={"name": "fine"}, files={"archive": ("a.tar.gz", _tgz(good))},
                       timeout=T)
        assert r.status_code == 201, r.text
