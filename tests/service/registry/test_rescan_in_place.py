"""Stored files changed in place (edited, or renamed over one file at a time) under a running registry: a
rescan notices them by the weights file's identity (inode, size, times) and the config's digest, lists the new
sha256 and serves the new files, lifts a quarantine the old files earned, and leaves an adapter whose files
only look touched as it is. Metadata from before identities were kept still scans without hashing, and a store
the registry cannot write is not hashed again at every rescan."""
import copy
import hashlib
import json
import os
import struct
import time

import pytest
import torch

from _fixtures import decoder_logits, hf_logits, input_ids, make_registry, peft_adapter, run
from service.registry import Conflict

WEIGHTS, CONFIG, META = "adapter_model.safetensors", "adapter_config.json", "registry.json"
NO_CHANGE = {"added": [], "removed": [], "changed": [], "updated": []}
# a file's times move by the kernel's clock tick (a few ms): a write in place within one tick of the write before
# it, at the same size, keeps its identity (as git's "racily clean" files); the tests' edits come later than that
TICK = 0.05


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _all_nan(weights: bytes) -> bytes:
    """A safetensors file of the same size and header whose fp32 values are all NaN."""
    start = 8 + struct.unpack_from("<Q", weights)[0]
    header = json.loads(weights[8:start])
    assert {entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {"F32"}
    return weights[:start] + b"\x00\x00\xc0\x7f" * ((len(weights) - start) // 4)


def _logits(registry, name, ids):
    async def go():
        lease = await registry.acquire(name)
        try:
            return decoder_logits(registry.model, lease.model_name, ids)
        finally:
            registry.release(lease)
    return go()


def test_weights_edited_in_place_are_served_after_a_rescan(tmp_path):
    old, new = peft_adapter("lora", seed=0), peft_adapter("lora", seed=1)
    assert len(old.weights) == len(new.weights)             # same size: only the identity tells them apart
    root, ids = tmp_path / "store", input_ids()

    async def main():
        registry = make_registry(root)
        await registry.register_files("a", old.config, old.weights)
        before = await _logits(registry, "a", ids)
        held = await registry.acquire("a")                  # a request still running on the old weights
        time.sleep(TICK)
        (root / "a" / WEIGHTS).write_bytes(new.weights)     # the same inode, written over
        assert await registry.rescan() == {**NO_CHANGE, "changed": ["a"]}
        assert registry.get("a").sha256 == _sha(root / "a" / WEIGHTS)
        assert json.loads((root / "a" / META).read_text())["sha256"] == _sha(root / "a" / WEIGHTS)
        after = await _logits(registry, "a", ids)
        registry.release(held)
        assert await registry.rescan() == NO_CHANGE
        await registry.drain()
        return before, after

    before, after = run(main())
    torch.testing.assert_close(before, hf_logits(old.model, ids), atol=1e-4, rtol=0)
    torch.testing.assert_close(after, hf_logits(new.model, ids), atol=1e-4, rtol=0)


def test_a_config_edited_in_place_is_served_after_a_rescan(tmp_path):
    lora = peft_adapter("lora")
    config = lora.config.decode()
    assert '"lora_alpha": 8,' in config
    edited = config.replace('"lora_alpha": 8,', '"lora_alpha": 9,').encode()     # same size, another scaling
    oracle = copy.deepcopy(lora.model)
    for module in oracle.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            module.scaling["default"] = 9 / 4
    root, ids = tmp_path / "store", input_ids()

    async def main():
        registry = make_registry(root)
        await registry.register_files("a", lora.config, lora.weights)
        await _logits(registry, "a", ids)
        (root / "a" / CONFIG).write_bytes(edited)
        assert await registry.rescan() == {**NO_CHANGE, "changed": ["a"]}
        assert registry.get("a").alpha == 9
        after = await _logits(registry, "a", ids)
        await registry.drain()
        return after

    after = run(main())
    torch.testing.assert_close(after, hf_logits(oracle, ids), atol=1e-4, rtol=0)
    assert not torch.allclose(after, hf_logits(lora.model, ids), atol=1e-3)


def test_a_quarantine_is_lifted_by_a_rescan_after_the_files_are_fixed(tmp_path):
    """A stored adapter whose weights fail the load's checks (NaN) is quarantined at its first request; the
    operator fixes the file by renaming a good one of the same size over it, and the next rescan serves it (it
    stayed quarantined until a restart: the recorded sha256 was trusted while the size matched)."""
    lora = peft_adapter("lora")
    root, ids = tmp_path / "store", input_ids()

    async def main():
        registry = make_registry(root)
        await registry.register_files("a", lora.config, lora.weights)
        await registry.drain()
        (root / "a" / WEIGHTS).write_bytes(_all_nan(lora.weights))
        registry = make_registry(root)
        await registry.scan()
        with pytest.raises(Conflict, match="non-finite"):
            await registry.acquire("a")
        assert registry.get("a").quarantined
        assert await registry.rescan() == NO_CHANGE          # nothing changed on disk: still quarantined
        (root / "fixed.safetensors").write_bytes(lora.weights)
        os.replace(root / "fixed.safetensors", root / "a" / WEIGHTS)
        assert await registry.rescan() == {**NO_CHANGE, "changed": ["a"]}
        assert not registry.get("a").quarantined and registry.get("a").served
        after = await _logits(registry, "a", ids)
        await registry.drain()
        return after

    torch.testing.assert_close(run(main()), hf_logits(lora.model, ids), atol=1e-4, rtol=0)


def test_files_only_touched_keep_their_record(tmp_path, monkeypatch):
    lora = peft_adapter("lora")
    root = tmp_path / "store"

    async def main():
        registry = make_registry(root)
        hashed = []
        digest = registry.store.digest
        monkeypatch.setattr(registry.store, "digest", lambda folder: hashed.append(folder) or digest(folder))
        await registry.register_files("a", lora.config, lora.weights)
        record = registry.get("a")
        assert len(hashed) == 1 and await registry.rescan() == NO_CHANGE and len(hashed) == 1
        path = root / "a" / WEIGHTS
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        assert await registry.rescan() == NO_CHANGE           # hashed again, the same bytes
        assert len(hashed) == 2 and registry.get("a") is record
        meta = json.loads((root / "a" / META).read_text())
        assert meta["weights_file"] == registry.store.weights_identity(str(root / "a"))
        assert meta["sha256"] == record.sha256 == _sha(path)
        await registry.drain()

    run(main())


def _old_store(root, adapter):
    """A store holding adapter "a" whose registry.json was written before identities were kept; (its path, its
    metadata)."""
    async def setup():
        registry = make_registry(root)
        await registry.register_files("a", adapter.config, adapter.weights)
        await registry.drain()
    run(setup())
    meta_path = root / "a" / META
    meta = json.loads(meta_path.read_text())
    del meta["weights_file"]
    meta_path.write_text(json.dumps(meta))
    return meta_path, meta


def test_old_metadata_and_an_unwritable_store_are_not_hashed_at_every_scan(tmp_path, monkeypatch):
    other = peft_adapter("lora", seed=1)
    root, ids = tmp_path / "store", input_ids()
    meta_path, _ = _old_store(root, peft_adapter("lora", seed=0))

    async def main():
        registry = make_registry(root)
        hashed = []
        digest = registry.store.digest
        monkeypatch.setattr(registry.store, "digest", lambda folder: hashed.append(folder) or digest(folder))

        def refuse(folder, meta):
            raise PermissionError("read-only file system")
        monkeypatch.setattr(registry.store, "write_meta", refuse)
        await registry.scan()
        assert hashed == [] and not registry.get("a").quarantined   # trusted as before, by its size
        assert await registry.rescan() == NO_CHANGE and hashed == []
        time.sleep(TICK)
        (root / "a" / WEIGHTS).write_bytes(other.weights)
        assert await registry.rescan() == {**NO_CHANGE, "changed": ["a"]}
        assert len(hashed) == 1 and registry.get("a").sha256 == _sha(root / "a" / WEIGHTS)
        assert await registry.rescan() == NO_CHANGE and len(hashed) == 1   # not written, but known here
        after = await _logits(registry, "a", ids)
        await registry.drain()
        return after

    torch.testing.assert_close(run(main()), hf_logits(other.model, ids), atol=1e-4, rtol=0)
    assert "weights_file" not in json.loads(meta_path.read_text())       # nothing was written


def test_old_metadata_is_not_rewritten_at_start_up(tmp_path):
    """A store written before identities were kept: the scan after the upgrade trusts each folder's metadata by
    its size and rewrites none of it (replicas may be changing it meanwhile); the identity is the record's."""
    root = tmp_path / "store"
    meta_path, meta = _old_store(root, peft_adapter("lora"))
    before = meta_path.read_bytes()

    async def main():
        registry = make_registry(root)
        await registry.scan()
        identity = registry.store.weights_identity(str(root / "a"))
        assert registry.get("a").weights_file == identity and registry.get("a").sha256 == meta["sha256"]
        assert await registry.rescan() == NO_CHANGE
        assert meta_path.read_bytes() == before
        await registry.pin("a")                                # the record's next metadata write carries it
        await registry.drain()
        return identity
    identity = run(main())
    assert json.loads(meta_path.read_text())["weights_file"] == identity
