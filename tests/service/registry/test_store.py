"""The store survives a crash: leftovers of interrupted writes are removed at start-up, every complete
adapter is registered again with the same sha256 and metadata, preloads reach the device tier, a folder
copied in by hand is validated like an upload, and a replace interrupted between its renames loses nothing."""
import hashlib
import io
import shutil
import tarfile

import torch

from _fixtures import decoder_logits, hf_logits, input_ids, make_registry, peft_adapter, run, store_files

KEEP = ("name", "kind", "rank", "alpha", "targets", "size", "sha256", "source", "created_at", "pinned", "served")


def _tgz(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"adapter/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_scan_after_a_crash_cleans_leftovers_and_restores_adapters(tmp_path):
    lora, ia3, adalora = peft_adapter("lora"), peft_adapter("ia3"), peft_adapter("adalora")
    root = tmp_path / "store"
    ids = input_ids()

    async def before_crash():
        registry = make_registry(root)
        await registry.register_files("a", lora.config, lora.weights)
        await registry.register_archive("b", _tgz({"adapter_config.json": ia3.config,
                                                   "adapter_model.safetensors": ia3.weights}), "b.tgz")
        await registry.register_path("c", str(adalora.write(tmp_path / "c-src")))
        await registry.pin("a")
        await registry.deactivate("b")
        return {r.name: {k: r.to_dict()[k] for k in KEEP} for r in registry.list()}

    records = run(before_crash())
    # what a kill -9 in the middle of writes leaves: a half-built staging folder, a deleted folder not yet
    # removed (a complete adapter, which must not come back), and a stray non-adapter folder
    (root / ".tmp-x").mkdir()
    (root / ".tmp-x" / "adapter_config.json").write_bytes(lora.config)
    shutil.copytree(root / "a", root / ".trash-y")
    (root / "notes").mkdir()

    async def after_restart():
        registry = make_registry(root, preload=["a", "b", "missing"])
        await registry.scan()
        lease = await registry.acquire("c")
        return registry, decoder_logits(registry.model, lease.model_name, ids)

    registry, got = run(after_restart())
    assert store_files(root) == sorted(
        ["notes"] + [f"{n}{f}" for n in "abc" for f in ("", "/adapter_config.json", "/adapter_model.safetensors",
                                                         "/registry.json")])
    assert {r.name: {k: r.to_dict()[k] for k in KEEP} for r in registry.list()} == records
    for name, adapter in {"a": lora, "b": ia3, "c": adalora}.items():
        stored = (root / name / "adapter_model.safetensors").read_bytes()
        assert registry.get(name).sha256 == hashlib.sha256(stored).hexdigest() == \
            hashlib.sha256(adapter.weights).hexdigest()
    assert registry.get("a").tier == "device" and registry.get("a").pinned     # preloaded
    assert registry.get("b").tier == "stored" and not registry.get("b").served  # deactivated: not preloaded
    torch.testing.assert_close(got, hf_logits(adalora.model, ids), atol=1e-4, rtol=0)


def test_scan_validates_hand_copied_folders(tmp_path):
    root = tmp_path / "store"
    good = peft_adapter("lora").write(root / "dropped-in")
    bad = peft_adapter("lora").write(root / "bad")
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "target_modules": ["nope"]}')
    (root / "bad name").mkdir()

    async def main():
        registry = make_registry(root)
        await registry.scan()
        return registry

    registry = run(main())
    assert [r.name for r in registry.list()] == ["bad", "dropped-in"]
    quarantined = registry.get("bad")                          # listed with its error, never served
    assert quarantined.quarantined and not quarantined.served and "matched no module" in quarantined.error
    assert quarantined.to_dict()["state"] == "quarantined"
    record = registry.get("dropped-in")
    assert record.source == {"type": "local", "path": str(good)}
    assert (good / "registry.json").is_file()                  # described once, not validated at every start


def test_replace_interrupted_between_renames_keeps_the_old_adapter(tmp_path):
    lora = peft_adapter("lora")
    root = tmp_path / "store"

    async def register():
        registry = make_registry(root)
        return (await registry.register_files("a", lora.config, lora.weights)).sha256

    sha = run(register())
    # the crash fell after "a" went to the trash and before the new folder was renamed into place
    (root / "a").rename(root / ".trash-0123abcd.a")
    (root / ".tmp-new").mkdir()

    async def restart():
        registry = make_registry(root)
        await registry.scan()
        return registry

    registry = run(restart())
    assert registry.get("a").sha256 == sha
    assert store_files(root) == ["a", "a/adapter_config.json", "a/adapter_model.safetensors", "a/registry.json"]
