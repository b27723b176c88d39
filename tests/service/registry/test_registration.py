"""Registering adapters from every source: uploads, archives, local folders, the hub (offline cache).
Adapters are made and saved by PEFT on a transformers Llama; served by our Decoder they must give PEFT's
logits, so the registry's load path is checked end to end against the reference."""
import hashlib
import io
import json
import shutil
import tarfile
import zipfile

import pytest
import torch

from service.registry import Conflict, NotFound

from _fixtures import (decoder_logits, hf_base, hf_logits, input_ids, make_registry, peft_adapter, run,
                       store_files, Events)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("kind", ["lora", "lora_rank_pattern", "ia3", "adalora"])
def test_served_adapter_gives_peft_logits(tmp_path, kind):
    adapter = peft_adapter(kind)
    ids = input_ids()

    async def main():
        registry = make_registry(tmp_path / "store")
        await registry.register_files("a", adapter.config, adapter.weights)
        lease = await registry.acquire("a")
        try:
            return decoder_logits(registry.model, lease.model_name, ids)
        finally:
            registry.release(lease)

    got = run(main())
    expected = hf_logits(adapter.model, ids)
    assert (expected - hf_logits(hf_base(), ids)).abs().max() > 1e-2        # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_record_fields_store_layout_and_events(tmp_path):
    adapter = peft_adapter("lora_rank_pattern")
    events = Events()

    async def main():
        registry = make_registry(tmp_path / "store", events=events)
        record = await registry.register_files("my.adapter-1", adapter.config, adapter.weights)
        lease = await registry.acquire("my.adapter-1")
        registry.release(lease)
        return registry, record

    registry, record = run(main())
    data = json.loads(json.dumps(record.to_dict()))          # JSON-able as is
    assert data["name"] == "my.adapter-1" and data["kind"] == "LORA"
    assert data["rank"] == 6 and data["alpha"] == 8.0                  # max over rank_pattern
    assert sorted(data["targets"]) == ["down_proj", "q_proj", "v_proj"]
    assert data["sha256"] == hashlib.sha256(adapter.weights).hexdigest()
    assert data["size"] == len(adapter.weights) + len(adapter.config)
    assert data["source"] == {"type": "upload"}
    assert data["tier"] == "device" and data["served"] and not data["pinned"]
    assert data["requests_served"] == 1 and data["in_use"] == 0
    assert data["created_at"] <= data["last_used_at"]
    assert store_files(tmp_path / "store") == ["my.adapter-1", "my.adapter-1/adapter_config.json",
                                               "my.adapter-1/adapter_model.safetensors",
                                               "my.adapter-1/registry.json"]
    meta = json.loads((tmp_path / "store" / "my.adapter-1" / "registry.json").read_text())
    assert meta["source"] == {"type": "upload"} and meta["served"] and not meta["pinned"]
    assert meta["created_at"] == record.created_at
    assert events.calls == [("uploaded", "my.adapter-1"), ("loaded", "my.adapter-1", "cpu")]
    assert registry.tier_counts() == {"stored": 0, "cpu": 0, "device": 1}
    assert [r.name for r in registry.list()] == ["my.adapter-1"]


def test_register_path_copies_the_folder(tmp_path):
    adapter = peft_adapter("ia3")
    folder = adapter.write(tmp_path / "src")
    (folder / "README.md").write_text("ignored")
    ids = input_ids()

    async def main():
        registry = make_registry(tmp_path / "store", max_cpu_adapters=0)
        record = await registry.register_path("ia3", str(folder))
        shutil.rmtree(folder)                     # the store has its own copy
        assert record.tier == "stored"            # max_cpu_adapters=0: nothing stays in RAM
        lease = await registry.acquire("ia3")
        return record, decoder_logits(registry.model, lease.model_name, ids)

    record, got = run(main())
    assert record.source == {"type": "local", "path": str(folder)}
    torch.testing.assert_close(got, hf_logits(adapter.model, ids), atol=1e-4, rtol=0)
    assert not (tmp_path / "store" / "ia3" / "README.md").exists()


def test_bin_weights_are_loaded_safely_and_stored_as_safetensors(tmp_path):
    from safetensors.torch import load as load_bytes
    adapter = peft_adapter("lora")
    tensors = load_bytes(adapter.weights)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    ids = input_ids()

    async def main():
        registry = make_registry(tmp_path / "store")
        record = await registry.register_files("bin", adapter.config, buffer.getvalue(),
                                               weights_filename="adapter_model.bin")
        lease = await registry.acquire("bin")
        return record, decoder_logits(registry.model, lease.model_name, ids)

    record, got = run(main())
    stored = tmp_path / "store" / "bin"
    assert sorted(p.name for p in stored.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "registry.json"]
    assert record.sha256 == hashlib.sha256((stored / "adapter_model.safetensors").read_bytes()).hexdigest()
    torch.testing.assert_close(got, hf_logits(adapter.model, ids), atol=1e-4, rtol=0)


def _zip(entries: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar(entries: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("layout", ["zip-top", "zip-folder", "tgz-folder", "tar.gz-dot"])
def test_archive_layouts(tmp_path, layout):
    adapter = peft_adapter("lora")
    files = {"adapter_config.json": adapter.config, "adapter_model.safetensors": adapter.weights,
             "README.md": b"# my adapter"}
    if layout == "zip-top":
        data, filename = _zip(files), "a.zip"
    elif layout == "zip-folder":
        data, filename = _zip({f"my-adapter/{k}": v for k, v in files.items()}), "a.zip"
    elif layout == "tgz-folder":
        data, filename = _tar({"my-adapter": None, **{f"my-adapter/{k}": v for k, v in files.items()}}), "a.tgz"
    else:
        data, filename = _tar({".": None, **{f"./{k}": v for k, v in files.items()}}), "a.tar.gz"

    async def main():
        registry = make_registry(tmp_path / "store")
        return await registry.register_archive("arch", data, filename)

    record = run(main())
    assert record.sha256 == hashlib.sha256(adapter.weights).hexdigest()
    assert record.source == {"type": "upload", "filename": filename}
    assert store_files(tmp_path / "store") == ["arch", "arch/adapter_config.json", "arch/adapter_model.safetensors",
                                               "arch/registry.json"]


def test_duplicate_name_needs_replace_and_replace_makes_a_new_registration(tmp_path):
    first, second = peft_adapter("lora", seed=0), peft_adapter("lora", seed=1)

    async def main():
        registry = make_registry(tmp_path / "store")
        old = await registry.register_files("a", first.config, first.weights)
        with pytest.raises(Conflict) as err:
            await registry.register_files("a", second.config, second.weights)
        assert err.value.status == 409 and "'a'" in str(err.value)
        new = await registry.register_files("a", second.config, second.weights, replace=True)
        return registry, old, new

    registry, old, new = run(main())
    assert registry.get("a") is new and old.retired
    assert new.model_name != old.model_name
    assert new.sha256 == hashlib.sha256(second.weights).hexdigest() != old.sha256
    assert store_files(tmp_path / "store") == ["a", "a/adapter_config.json", "a/adapter_model.safetensors",
                                               "a/registry.json"]


def _fake_cache(cache, repo_id, adapter, commit=COMMIT, revision="main"):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    adapter.write(repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


def test_hub_registration_from_offline_cache(tmp_path, offline_cache):
    main_adapter, v2_adapter = peft_adapter("lora", seed=0), peft_adapter("lora", seed=2)
    _fake_cache(offline_cache, "someone/tiny-lora", main_adapter)
    second = "fedcba9876543210fedcba9876543210fedcba98"
    _fake_cache(offline_cache, "someone/tiny-lora", v2_adapter, commit=second, revision="v2")
    ids = input_ids()

    async def main():
        registry = make_registry(tmp_path / "store")
        a = await registry.register_hub("hub-main", "someone/tiny-lora")
        b = await registry.register_hub("hub-v2", "someone/tiny-lora", revision="v2")
        with pytest.raises(NotFound) as err:
            await registry.register_hub("missing", "nobody/missing")
        assert err.value.status == 404 and "nobody/missing" in str(err.value)
        lease = await registry.acquire("hub-v2")
        return registry, a, b, decoder_logits(registry.model, lease.model_name, ids)

    registry, a, b, got = run(main())
    assert a.source == {"type": "hub", "repo_id": "someone/tiny-lora", "revision": None, "commit": COMMIT}
    assert b.source["revision"] == "v2" and b.source["commit"] == second
    assert a.sha256 == hashlib.sha256(main_adapter.weights).hexdigest()
    assert [r.name for r in registry.list()] == ["hub-main", "hub-v2"]
    torch.testing.assert_close(got, hf_logits(v2_adapter.model, ids), atol=1e-4, rtol=0)
