"""Adapters that share a module the other way (a black-box probe's finding F3): one keeps a `modules_to_save`
copy of `lm_head` and another adapts `lm_head` with LoRA. They cannot be in the model together (before the fix
the LoRA one was silently loaded without its lm_head factors, or the copy refused as "matches no module"), so
the registry takes them in turn: loading one evicts the other when it is idle, a request for one waits (429)
while the other is in use, and a pinned one makes the other a 409. Each serves as PEFT serves it."""
import asyncio
import copy
import tempfile
from pathlib import Path

import peft
import pytest
import torch

import adapters_core as ac
from service.registry import Conflict, Unavailable

from _fixtures import decoder_logits, hf_base, hf_logits, input_ids, make_registry, run


def peft_files(config, seed):
    pm = peft.get_peft_model(copy.deepcopy(hf_base()), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    pm.eval()
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        return Path(tmp, "adapter_config.json").read_bytes(), Path(tmp, "adapter_model.safetensors").read_bytes(), pm


COPY = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])  # noqa
ADAPT = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])  # noqa


def test_unit_conflicts_are_named_not_silent():
    model = copy.deepcopy(hf_base())
    ac.inject_adapter_in_model(ac.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), model, "c")
    adapt = ac.LoraConfig(r=2, target_modules=["lm_head"])
    assert ac.conflicting_adapters(model, adapt) == ["c"]
    assert ac.conflicting_adapters(model, ac.LoraConfig(r=2, target_modules=["v_proj"])) == []
    with pytest.raises(ac.ModuleConflictError, match="modules_to_save copies of adapter.*'c'") as caught:
        ac.inject_adapter_in_model(adapt, model, "a")
    assert caught.value.holders == ["c"] and "a" not in model.peft_config
    other = copy.deepcopy(hf_base())
    ac.inject_adapter_in_model(adapt, other, "a")
    copy_cfg = ac.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    assert ac.conflicting_adapters(other, copy_cfg) == ["a"]
    with pytest.raises(ac.ModuleConflictError, match="adapted by adapter.*'a'"):
        ac.inject_adapter_in_model(copy_cfg, other, "c")
    assert "c" not in other.peft_config and not hasattr(other.model.layers[0].self_attn.q_proj, "lora_A") or \
        "c" not in other.model.layers[0].self_attn.q_proj.lora_A


@pytest.mark.parametrize("first", ["copy", "adapt"])
def test_the_registry_takes_them_in_turn(tmp_path, first):
    files = {"copy": peft_files(COPY(), 1), "adapt": peft_files(ADAPT(), 2)}
    second = "adapt" if first == "copy" else "copy"
    ids = input_ids()

    async def main():
        registry = make_registry(tmp_path / "store", max_device_adapters=8)
        for name, (cfg, weights, _) in files.items():
            await registry.register_files(name, cfg, weights)

        async def check(name):
            lease = await registry.acquire(name)
            got = decoder_logits(registry.model, lease.model_name, ids)
            assert (got - hf_logits(files[name][2], ids)).abs().max() < 1e-4, name
            return lease

        registry.release(await check(first))
        held = await check(second)                    # the first, idle, left the model for it
        with pytest.raises(Unavailable, match=f"adapter '{second}', in use"):
            await registry.acquire(first)
        registry.release(held)
        registry.release(await check(first))          # and back, each as PEFT serves it
        await registry.pin(first)
        with pytest.raises(Conflict, match=f"adapter '{first}' is pinned"):
            await registry.acquire(second)
    run(main())


def test_a_load_refused_for_room_leaves_its_conflicting_victims_in_place(tmp_path):
    """The holders a load would evict stay on the device, idle and loadable, when the load is then refused for
    room (their eviction never runs)."""
    files = {"copy": peft_files(COPY(), 1), "adapt": peft_files(ADAPT(), 2)}
    ids = input_ids()

    async def main():
        registry = make_registry(tmp_path / "store", max_device_adapters=8)
        for name, (cfg, weights, _) in files.items():
            await registry.register_files(name, cfg, weights)
        registry.release(await registry.acquire("copy"))

        def no_room(record):
            raise Unavailable("no room (a test's refusal)")
        registry._take_device_room = no_room
        with pytest.raises(Unavailable, match="no room"):
            await registry.acquire("adapt")
        del registry._take_device_room
        held = registry.get("copy")
        assert (held.tier, held.busy, held.pending) == ("device", False, None)
        lease = await asyncio.wait_for(registry.acquire("copy"), 5)
        assert (decoder_logits(registry.model, lease.model_name, ids) - hf_logits(files["copy"][2], ids)).abs().max() < 1e-4
        registry.release(lease)
    run(main())
