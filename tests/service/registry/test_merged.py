"""Merged adapters in the registry: one record per spec, in the model beside the registered adapters (its
logits those of PEFT's add_weighted_adapter), evicted to the cpu tier and loaded back from its kept tensors
unchanged, at most `max_merged_adapters` of them, forgotten when pushed out of the cpu tier or when a source
is deleted; refused specs (non-LoRA or deactivated sources, mixed ranks, in-use limit) change nothing."""
import copy

import peft
import pytest
import torch

import adapters_core as ac
from service.registry import Conflict, Invalid, MergeSpec, Unavailable

from _fixtures import assert_same_model, fingerprint, hf_base, input_ids, make_registry, peft_adapter, run


async def _registry(tmp_path, **kw):
    registry = make_registry(tmp_path / "store", **kw)
    for name, kind, seed in (("a", "lora", 1), ("b", "lora", 2), ("ia3", "ia3", 3), ("wide", "lora_rank_pattern", 4),
                             ("narrow", "lora_low_pattern", 5)):
        adapter = peft_adapter(kind, seed=seed)
        await registry.register_files(name, adapter.config, adapter.weights)
    return registry


def _logits(model, adapter_name, ids):
    with torch.inference_mode(), ac.mixed_batch(model, [adapter_name] * ids.shape[0]):
        return model(ids)


def test_merged_adapter_is_peft_merge_survives_tiers_and_is_bounded(tmp_path):
    async def main():
        registry = await _registry(tmp_path, max_device_adapters=3, max_cpu_adapters=4, max_merged_adapters=2)
        spec = MergeSpec(("a", "b"), (0.7, -0.4), "ties", 0.5, "total")
        lease = await registry.acquire_merged(spec)
        ids = input_ids()
        merged = _logits(registry.model, lease.model_name, ids)
        registry.release(lease)
        again = await registry.acquire_merged(MergeSpec(("a", "b"), (0.7, -0.4), "ties", 0.5, "total"))
        assert again.model_name == lease.model_name and len(registry._merged) == 1      # cached by its spec
        registry.release(again)
        for name in ("ia3", "wide", "a"):                  # push it out of the device tier
            registry.release(await registry.acquire(name))
        record = next(iter(registry._merged.values()))
        assert record.tier == "cpu" and record.tensors is not None
        back = await registry.acquire_merged(spec)
        assert torch.equal(_logits(registry.model, back.model_name, ids), merged)        # reloaded unchanged
        await registry.acquire_merged(MergeSpec(("a",), (0.5,)))                       # held: not evictable
        with pytest.raises(Unavailable, match="max_merged_adapters"):
            await registry.acquire_merged(MergeSpec(("b",), (0.5,)))
        registry.release(back)
        third = await registry.acquire_merged(MergeSpec(("b",), (0.5,)))                # evicts the idle one
        assert len(registry._merged) == 2 and record.retired
        registry.release(third)
        await registry.delete("b")                      # its merged adapter goes with it
        await registry.drain()
        assert all("b" not in r.source["ids"] for r in registry._merged.values())
        in_model = {n for n in registry.model.peft_config if n.startswith("merged-")}
        assert in_model == {r.model_name for r in registry._merged.values() if r.tier == "device"}
        return merged, ids

    merged, ids = run(main())
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base()), str(peft_adapter("lora", 1).write(tmp_path / "pa")),
                                        adapter_name="a")
    pm.load_adapter(str(peft_adapter("lora", 2).write(tmp_path / "pb")), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type="ties", density=0.5)
    pm.set_adapter("mix")
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=0)


def test_refused_specs_change_nothing(tmp_path):
    async def main():
        registry = await _registry(tmp_path)
        registry.release(await registry.acquire("a"))
        registry.release(await registry.acquire("narrow"))     # its ranks are seen in the model, once loaded
        before = fingerprint(registry.model)
        for spec, error, match in [
            (MergeSpec(("a", "ia3"), (0.5, 0.5)), Invalid, r"ids\[1\].*IA3"),
            (MergeSpec(("a", "wide"), (0.5, 0.5)), Invalid, "one rank"),      # r 4 and a rank_pattern's 6
            # the same largest rank, but v_proj's is 2 in one (a 500 before: the factors' stack failed)
            (MergeSpec(("a", "narrow"), (0.5, 0.5)), Invalid, r"merged_adapters: .*one rank in every module.*v_proj"),
            (MergeSpec(("a", "b"), (0.5, float("inf"))), Invalid, "weights"),
            (MergeSpec(("a", "b"), (0.5, 1e308)), Invalid, r"weights: every weight must be a finite number in \[-10, 10\]"),
            (MergeSpec(("a", "b"), (-10.5, 0.5)), Invalid, "weights"),
            (MergeSpec(("a", "b"), (0.5, 0.5), "dare_ties"), Invalid, "density"),
        ]:
            with pytest.raises(error, match=match):
                await registry.acquire_merged(spec)
        await registry.deactivate("b")
        with pytest.raises(Conflict, match=r"ids\[1\].*deactivated"):
            await registry.acquire_merged(MergeSpec(("a", "b"), (0.5, 0.5)))
        assert not registry._merged
        assert_same_model(before, registry.model)

    run(main())
