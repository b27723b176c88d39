"""Copies of base weights in adapter files (a black-box probe's finding, RELIABILITY.md "LoRA-family configs"):
PEFT saves the embedding and output layers' weights with a LoRA that targets them, and the biases that
`bias="all"` trains; a shared base must never take them. Copies equal to the served weights (within the
served format's rounding) are left out, so the adapter serves as PEFT does and the base model and every other
adapter are unchanged (also on stored-format weights, which refused them before); a copy that differs is a 422
naming it, and nothing changes."""
import copy
import json
import tempfile
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load, load_file, save, save_file

from _fixtures import HF_KW, config_of, decoder_logits, hf_base, hf_logits, input_ids, make_registry, run
from service.model.decoder import Decoder
from service.model.quant_formats import from_dense
from service.model.quant_linear import QuantLinear
from service.registry import Invalid
from service.registry.base_copies import is_base_copy

import adapters_core as ac


def peft_files(base, config, seed: int, perturb=None, train_biases: bool = False):
    """(config bytes, weights bytes, the PEFT model) of an adapter PEFT makes on `base` and saves with its
    defaults; `perturb(key)` says which saved base copies get noise (a base that differs)."""
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif train_biases and name.endswith(".bias"):
                p.add_(0.5 + 0.1 * torch.randn(p.shape, generator=g))
    pm.eval()
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        weights = load_file(f"{tmp}/adapter_model.safetensors")
        for key in [k for k in weights if perturb is not None and perturb(k)]:
            weights[key] = weights[key] + 0.2 * weights[key].std() * torch.randn(weights[key].shape, generator=g)
        save_file(weights, f"{tmp}/adapter_model.safetensors")
        return (Path(tmp, "adapter_config.json").read_bytes(), Path(tmp, "adapter_model.safetensors").read_bytes(),
                pm)


def decoder_of(hf, stored_format=None) -> Decoder:
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    stored = {}
    if stored_format is not None:
        for key in [k for k in state if k.endswith(("_proj.weight", "lm_head.weight", "embed_tokens.weight"))]:
            stored[key] = from_dense(state.pop(key), stored_format)
    return Decoder.from_state_dict(config_of(hf.config), state, stored=stored)


def base_weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def embedding_lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head", "embed_tokens"])


def test_peft_saves_base_copies_and_they_are_told_apart():
    cfg, weights, _ = peft_files(hf_base(), embedding_lora(), seed=0)
    config = ac.config_from_dict(json.loads(cfg))
    keys = load_file_bytes(weights)
    copies = sorted(k for k in keys if is_base_copy(config, k))
    assert copies == ["base_model.model.lm_head.base_layer.weight", "base_model.model.model.embed_tokens.base_layer.weight"]
    mts = ac.config_from_dict({**json.loads(cfg), "modules_to_save": ["lm_head"]})
    assert not is_base_copy(mts, "base_model.model.lm_head.weight") and is_base_copy(config, "base_model.model.lm_head.weight")


def load_file_bytes(data: bytes) -> dict:
    return load(data)


def save_bytes(tensors: dict) -> bytes:
    return save(tensors)


@pytest.mark.parametrize("stored_format", [None, "F32", "I8"])
def test_equal_copies_are_left_out_and_nothing_else_changes(tmp_path, stored_format):
    """Two adapters targeting lm_head / embed_tokens (with PEFT's copies) and a plain one: each serves as PEFT
    does, the base model's weights are the same after loading them, and the plain adapter is unchanged."""
    hf = hf_base()
    model = decoder_of(hf, stored_format)
    before = base_weights(model)
    ids = input_ids()
    exact = stored_format in (None, "F32")     # int8 weights: PEFT on fp32 differs by the quantization
    plain_cfg, plain_w, plain_pm = peft_files(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"]), 7)

    async def main():
        registry = make_registry(tmp_path / "store", model=model, max_device_adapters=8)
        await registry.register_files("plain", plain_cfg, plain_w)
        lease = await registry.acquire("plain")
        plain_before = decoder_logits(model, lease.model_name, ids)
        registry.release(lease)
        for seed, name in enumerate(["e1", "e2"]):
            cfg, weights, pm = peft_files(hf, embedding_lora(), seed=seed)
            await registry.register_files(name, cfg, weights)
            lease = await registry.acquire(name)
            got = decoder_logits(model, lease.model_name, ids)
            registry.release(lease)
            if exact:
                assert (got - hf_logits(pm, ids)).abs().max() < 1e-4
            else:                    # the same as the adapter without its copies (a file stored formats took)
                own = {k: v for k, v in load_file_bytes(weights).items() if "base_layer" not in k}
                await registry.register_files(f"{name}-own", cfg, save_bytes(own))
                lease = await registry.acquire(f"{name}-own")
                assert torch.equal(decoder_logits(model, lease.model_name, ids), got)
                registry.release(lease)
            assert (got - decoder_logits(model, "__base__", ids)).abs().max() > 1e-2     # the adapter does act
        lease = await registry.acquire("plain")
        assert torch.equal(decoder_logits(model, lease.model_name, ids), plain_before)
        assert not exact or (plain_before - hf_logits(plain_pm, ids)).abs().max() < 1e-4
        registry.release(lease)
        listed = {r.name: r for r in registry.list()}
        assert listed["e1"].resident_size < 2 * sum(t.numel() * 4 for n, t in hf.named_parameters()
                                                      if "q_proj" in n) + 2**20     # the copies are not held
    run(main())
    after = base_weights(model)
    for key, value in before.items():
        if key in after:
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize("which", ["lm_head", "embed_tokens"])
def test_a_copy_of_another_base_is_refused_naming_it(tmp_path, which):
    hf = hf_base()
    model = decoder_of(hf)
    before = base_weights(model)
    cfg, weights, _ = peft_files(hf, embedding_lora(), seed=3, perturb=lambda k: f"{which}.base_layer" in k)

    async def main():
        registry = make_registry(tmp_path / "store", model=model)
        with pytest.raises(Invalid, match=rf"{which}\.base_layer\.weight.*differs from the served model's"):
            await registry.register_files("other", cfg, weights)
        assert registry.list() == []
    run(main())
    assert all(torch.equal(base_weights(model)[k], v) for k, v in before.items())


def biased_base() -> transformers.LlamaForCausalLM:
    torch.manual_seed(1)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_KW, "attention_bias": True})).eval()


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_adapters_serve_when_their_biases_are_the_bases_and_are_refused_when_trained(tmp_path, bias):
    """`bias="all"` / `"lora_only"` saves the biases; untouched, they are the base's: two such adapters serve
    side by side as PEFT (PEFT's one-per-model rule does not apply to copies); trained, the adapter is refused."""
    hf = biased_base()
    model = decoder_of(hf)
    before = base_weights(model)
    ids = input_ids()
    lora = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias)  # noqa: E731

    async def main():
        registry = make_registry(tmp_path / "store", model=model, max_device_adapters=8)
        for seed, name in enumerate(["b1", "b2"]):
            cfg, weights, pm = peft_files(hf, lora(), seed=seed)
            assert any(k.endswith(".bias") for k in load_file_bytes(weights))
            await registry.register_files(name, cfg, weights)
            lease = await registry.acquire(name)
            assert (decoder_logits(model, lease.model_name, ids) - hf_logits(pm, ids)).abs().max() < 1e-4
            registry.release(lease)
        cfg, weights, _ = peft_files(hf, lora(), seed=5, train_biases=True)
        with pytest.raises(Invalid, match=r"bias.*differs from the served model's"):
            await registry.register_files("trained", cfg, weights)
    run(main())
    after = base_weights(model)
    assert all(torch.equal(after[k], v) for k, v in before.items() if k in after)


def test_a_stored_format_model_checks_copies_against_its_dequantised_weights(tmp_path):
    hf = hf_base()
    model = decoder_of(hf, "I8")
    assert isinstance(model.lm_head, QuantLinear)
    cfg, weights, _ = peft_files(hf, embedding_lora(), seed=4, perturb=lambda k: "lm_head.base_layer" in k)

    async def main():
        registry = make_registry(tmp_path / "store", model=model)
        with pytest.raises(Invalid, match=r"differs from the served model's by .* served I8 weights' rounding"):
            await registry.register_files("other", cfg, weights)
    run(main())
