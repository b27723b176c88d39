"""`adapter_dtype`: with `bfloat16` (or `float16`) an fp32 adapter's LoRA / AdaLoRA factors are held in that
dtype (model parameters, slot tables, the record's tensors and bytes, the memory budget), and its logits are
PEFT's with the same weights rounded to that dtype and computed in fp32; IA3 vectors stay as stored; the store
keeps the uploaded bytes; `auto` is today's behaviour bit for bit; an invalid value is refused naming the
setting, as is an adapter that does not fit float16's range.

Tolerance: the served delta reads the rounded factors exactly (bf16 / fp16 -> fp32 is exact) and multiplies fp32
activations with fp32 accumulation (the fused kernel; without it, decode-shaped segments of <= 4 tokens run in
fp32 too, `LayerStack.compute_dtype`), so ours and PEFT with rounded weights compute the same function and
differ only in fp32 summation order: the 1e-4 on logits the other registry tests use against PEFT. Against PEFT
with the unrounded fp32 weights the logits differ by ~0.1 (bf16) and ~3e-3 (fp16), so the comparison tells the
two apart."""
import copy
import hashlib

import pytest
import torch
from safetensors.torch import load, save

from adapters_core import sgmv
from adapters_core.packing import tensor_bytes
from service.registry import AdapterRegistry, Invalid, MergeSpec
from service.registry.adapter_dtype import DTYPES

from _fixtures import decoder, decoder_logits, hf_logits, input_ids, make_registry, peft_adapter, run

TOL = 1e-4
SEQ = 7 if sgmv.kernel() is not None else 4       # see the docstring


def rounded_peft(kind: str, dtype: torch.dtype, seed: int = 0):
    """PEFT's model for `peft_adapter(kind, seed)` with every adapter tensor rounded to `dtype`, kept in fp32."""
    model = copy.deepcopy(peft_adapter(kind, seed).model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(dtype).float())
    return model


def factor_params(model, model_name: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if f".{model_name}" in n}


@pytest.mark.parametrize("kind", ["lora", "adalora"])
@pytest.mark.parametrize("setting", ["bfloat16", "float16"])
def test_fp32_adapter_is_held_in_the_setting_and_serves_peft_with_rounded_weights(tmp_path, kind, setting):
    adapter, dtype = peft_adapter(kind), DTYPES[setting]
    ids = input_ids(seq=SEQ)

    async def main():
        registry = make_registry(tmp_path / "store", adapter_dtype=setting)
        record = await registry.register_files("a", adapter.config, adapter.weights)
        assert {t.dtype for t in record.tensors.values()} == {dtype}            # the cpu tier holds it cast
        lease = await registry.acquire("a")
        params = factor_params(registry.model, lease.model_name)
        assert params and {p.dtype for p in params.values()} == {dtype}         # over an fp32 dense base
        for layer in (m for m in registry.model.modules() if getattr(m, "stack", None) is not None):
            for a, bt, _ in layer.stack.lora.values():
                assert a.dtype == bt.dtype == dtype
            assert not layer.stack.off_table                                     # the fused kernel reads them
        got = decoder_logits(registry.model, lease.model_name, ids)
        registry.release(lease)
        return registry, record, got

    registry, record, got = run(main())
    torch.testing.assert_close(got, hf_logits(rounded_peft(kind, dtype), ids), atol=TOL, rtol=0)
    assert (got - hf_logits(adapter.model, ids)).abs().max() > 10 * TOL            # the rounding is visible
    weights = tensor_bytes(load(adapter.weights))
    assert record.dtype == setting and record.to_dict()["dtype"] == setting
    assert record.size == len(adapter.config) + len(adapter.weights)               # the stored files' bytes
    assert record.resident_size == record.size - weights // 2                       # the weights at 2 bytes
    assert registry.tier_bytes()["device"] == record.resident_size


def test_auto_keeps_fp32_bit_for_bit(tmp_path):
    adapter = peft_adapter("lora")
    ids = input_ids(seq=SEQ)

    async def serve(folder, **kw):
        registry = make_registry(folder, **kw)
        record = await registry.register_files("a", adapter.config, adapter.weights)
        lease = await registry.acquire("a")
        params = factor_params(registry.model, lease.model_name)
        return record, params, decoder_logits(registry.model, lease.model_name, ids)

    record, params, auto = run(serve(tmp_path / "auto", adapter_dtype="auto"))
    _, _, default = run(serve(tmp_path / "default"))
    assert torch.equal(auto, default)
    assert {p.dtype for p in params.values()} == {torch.float32}
    assert record.dtype == "float32" and record.resident_size == record.size
    torch.testing.assert_close(auto, hf_logits(adapter.model, ids), atol=TOL, rtol=0)


def test_ia3_vectors_stay_as_stored(tmp_path):
    adapter = peft_adapter("ia3")
    ids = input_ids(seq=SEQ)

    async def main():
        registry = make_registry(tmp_path / "store", adapter_dtype="bfloat16")
        record = await registry.register_files("v", adapter.config, adapter.weights)
        lease = await registry.acquire("v")
        params = factor_params(registry.model, lease.model_name)
        return record, params, decoder_logits(registry.model, lease.model_name, ids)

    record, params, got = run(main())
    assert params and {p.dtype for p in params.values()} == {torch.float32}
    assert record.dtype == "float32" and record.resident_size == record.size
    torch.testing.assert_close(got, hf_logits(adapter.model, ids), atol=TOL, rtol=0)


def test_stored_files_stay_as_uploaded_and_reload_cast(tmp_path):
    """The store keeps the uploaded bytes (sha256 and size are the file's); a restart reads them and casts again."""
    adapter = peft_adapter("lora", seed=3)
    store = tmp_path / "store"

    async def main():
        registry = make_registry(store, adapter_dtype="bfloat16")
        first = await registry.register_files("a", adapter.config, adapter.weights)
        again = make_registry(store, adapter_dtype="bfloat16")                  # a restart on the same store
        await again.scan()
        assert again.get("a").dtype is None                                      # not read yet
        lease = await again.acquire("a")
        return first, again.get("a"), factor_params(again.model, lease.model_name)

    first, reloaded, params = run(main())
    assert (store / "a" / "adapter_model.safetensors").read_bytes() == adapter.weights
    assert (store / "a" / "adapter_config.json").read_bytes() == adapter.config
    assert first.sha256 == reloaded.sha256 == hashlib.sha256(adapter.weights).hexdigest()
    assert (reloaded.dtype, reloaded.resident_size) == ("bfloat16", first.resident_size)
    assert {p.dtype for p in params.values()} == {torch.bfloat16}


def test_memory_budget_counts_the_cast_bytes(tmp_path):
    """Three adapters whose stored bytes exceed the budget fit it once held in bf16."""
    async def main():
        registry = make_registry(tmp_path / "store", adapter_dtype="bfloat16")
        for i, name in enumerate("abc"):
            adapter = peft_adapter("lora", seed=i)
            await registry.register_files(name, adapter.config, adapter.weights)
        records = registry.list()
        registry.memory_budget = sum(r.resident_size for r in records)
        assert sum(r.size for r in records) > registry.memory_budget
        for name in "abc":
            registry.release(await registry.acquire(name))
        await registry.drain()
        return registry

    registry = run(main())
    assert registry.tier_counts()["device"] == 3
    assert registry.tier_bytes()["device"] == registry.memory_budget


def test_merged_adapter_is_held_in_the_setting(tmp_path):
    async def main():
        registry = make_registry(tmp_path / "store", adapter_dtype="bfloat16")
        for name, seed in (("a", 1), ("b", 2)):
            adapter = peft_adapter("lora", seed=seed)
            await registry.register_files(name, adapter.config, adapter.weights)
        lease = await registry.acquire_merged(MergeSpec(("a", "b"), (0.6, 0.4)))
        return lease.record, factor_params(registry.model, lease.model_name)

    record, params = run(main())
    assert params and {p.dtype for p in params.values()} == {torch.bfloat16}
    assert record.dtype == "bfloat16" and record.resident_size == record.size == tensor_bytes(record.tensors)


def test_an_invalid_setting_is_refused_naming_it(tmp_path):
    from pydantic import ValidationError

    from service.cli import settings_problem
    from service.settings import Settings

    with pytest.raises(ValueError, match="adapter_dtype must be one of auto, float32, bfloat16, float16; got 'bf16'"):
        AdapterRegistry(decoder(), lambda fn: None, str(tmp_path / "store"), adapter_dtype="bf16")
    with pytest.raises(ValidationError) as info:
        Settings(adapter_dtype="half")
    assert settings_problem(info.value) == ("ADAPTER_SERVE_ADAPTER_DTYPE: must be one of auto, float32, bfloat16, "
                                            "float16; got 'half'")
    assert Settings().adapter_dtype == "auto"


def test_float16_refuses_values_beyond_its_range_naming_the_setting(tmp_path):
    adapter = peft_adapter("lora")
    tensors = load(adapter.weights)
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 1e6                                                      # finite in fp32, not in fp16

    async def main():
        registry = make_registry(tmp_path / "store", adapter_dtype="float16")
        with pytest.raises(Invalid, match=r"beyond the range of float16.*adapter_dtype") as info:
            await registry.register_files("big", adapter.config, save(tensors, metadata={"format": "pt"}))
        assert key in str(info.value) and registry.list() == []
        make = make_registry(tmp_path / "fine", adapter_dtype="bfloat16")     # bf16 has fp32's range
        assert (await make.register_files("big", adapter.config, save(tensors))).dtype == "bfloat16"

    run(main())
