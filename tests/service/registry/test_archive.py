"""Archive extraction on its own: which member paths are safe, what gets written (only the PEFT files,
flat), and a `.bin` inside an archive that ends up as safetensors in the store."""
import io
import os
import zipfile

import pytest
import torch
from safetensors.torch import load as load_bytes

from service.registry import Invalid
from service.registry.archive import extract_archive, member_parts

from _fixtures import make_registry, peft_adapter, run


@pytest.mark.parametrize("name, parts", [("a/b.json", ("a", "b.json")), ("./x", ("x",)), ("d/", ("d",)),
                                         ("a/./b", ("a", "b"))])
def test_safe_member_paths(name, parts):
    assert member_parts(name) == parts


@pytest.mark.parametrize("name", ["/abs", "C:/x", "c:x", "a\\b", "../x", "a/../../b", "a/..", "", "a\x00b"])
def test_unsafe_member_paths(name):
    with pytest.raises(Invalid):
        member_parts(name)


def _zip(entries: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_only_the_peft_files_are_written(tmp_path):
    adapter = peft_adapter("lora")
    data = _zip({"x/adapter_config.json": adapter.config, "x/adapter_model.safetensors": adapter.weights,
                 "x/README.md": b"hi", "x/checkpoint-1/adapter_config.json": b"{}", "other.txt": b"1"})
    written = extract_archive(data, "a.zip", str(tmp_path), max_bytes=10**6)
    assert sorted(written) == sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == adapter.weights


def test_bin_inside_an_archive_is_stored_as_safetensors(tmp_path):
    adapter = peft_adapter("ia3")
    buffer = io.BytesIO()
    torch.save(load_bytes(adapter.weights), buffer)

    async def main():
        registry = make_registry(tmp_path / "store")
        return await registry.register_archive(
            "a", _zip({"adapter_config.json": adapter.config, "adapter_model.bin": buffer.getvalue()}), "a.zip")

    record = run(main())
    stored = load_bytes((tmp_path / "store" / "a" / "adapter_model.safetensors").read_bytes())
    expected = load_bytes(adapter.weights)
    assert stored.keys() == expected.keys() and all(torch.equal(stored[k], expected[k]) for k in stored)
    assert record.kind == "IA3" and record.rank is None
