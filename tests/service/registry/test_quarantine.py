"""Quarantine: a stored adapter that fails today's checks never breaks the registry. Found at start-up
(config) or when its weights are first read (NaN tensors), it is kept as a record with its error, listed
and shown as valid JSON, refused with 409 by acquire / activate / deactivate / pin, left alone by rescan,
and removed by delete or replaced by a good upload."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from service.registry import Conflict

from _fixtures import make_registry, peft_adapter, run


def _nan_weights(folder):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))


def test_stored_adapters_failing_the_checks_are_quarantined(tmp_path):
    lora = peft_adapter("lora")
    root = tmp_path / "store"

    async def setup():
        registry = make_registry(root)
        for name in ("good", "nan-alpha", "nan-weights"):
            await registry.register_files(name, lora.config, lora.weights)

    run(setup())
    config = json.loads((root / "nan-alpha" / "adapter_config.json").read_text())
    (root / "nan-alpha" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("inf")}))
    _nan_weights(root / "nan-weights")

    async def main():
        registry = make_registry(root)
        await registry.scan()
        bad = registry.get("nan-alpha")
        assert bad.quarantined and "lora_alpha" in bad.error and not bad.served
        for verb in (registry.acquire, registry.activate, registry.deactivate, registry.pin):
            with pytest.raises(Conflict, match="quarantined"):
                await verb("nan-alpha")
        assert not registry.get("nan-weights").quarantined        # weights are read at the first load
        with pytest.raises(Conflict, match="non-finite"):
            await registry.acquire("nan-weights")
        assert registry.get("nan-weights").quarantined
        for record in registry.list():
            json.dumps(record.to_dict(), allow_nan=False)
        assert await registry.rescan() == {"added": [], "removed": [], "changed": [], "updated": []}
        lease = await registry.acquire("good")
        registry.release(lease)
        await registry.delete("nan-alpha")
        await registry.register_files("nan-weights", lora.config, lora.weights, replace=True)
        lease = await registry.acquire("nan-weights")
        registry.release(lease)
        await registry.drain()
        return registry

    registry = run(main())
    assert [r.name for r in registry.list()] == ["good", "nan-weights"]
    assert not (root / "nan-alpha").exists()


@pytest.mark.parametrize("value, message", [(float("nan"), "non-finite"), (1e6, "beyond the range of float16")])
def test_a_stored_tensor_that_is_not_finite_as_held_is_quarantined_by_name(tmp_path, value, message):
    """One value of one stored tensor is enough (the loader's read checks every tensor as it places it): a NaN
    in the file, or a value finite in the fp32 file but beyond the held dtype's range (adapter_dtype float16).
    The error names the tensor; its neighbour in the same store loads."""
    lora = peft_adapter("lora")
    root = tmp_path / "store"

    async def setup():
        registry = make_registry(root)
        for name in ("good", "bad"):
            await registry.register_files(name, lora.config, lora.weights)
        await registry.drain()
    run(setup())
    path = str(root / "bad" / "adapter_model.safetensors")
    tensors = load_file(path)
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[1]
    tensors[key][1, 0] = value
    save_file(tensors, path)

    async def main():
        registry = make_registry(root, adapter_dtype="float16")
        await registry.scan()
        with pytest.raises(Conflict, match=message) as info:
            await registry.acquire("bad")
        assert key in str(info.value) and registry.get("bad").quarantined
        registry.release(await registry.acquire("good"))
        await registry.drain()
    run(main())
