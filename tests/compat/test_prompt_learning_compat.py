"""Differential tests: PEFT's prompt tuning, P-tuning (MLP, LSTM) and prefix tuning (with and without projection)
adapters, saved by PEFT with inference_mode True and False, give through adapters_core the logits and greedy
continuations of `PeftModelForCausalLM` on a tiny GQA Llama (4 query heads, 2 key/value heads).

Our side is the plain transformers model fed the way `../shared/reference/prompt-learning.md` says PEFT
feeds it: prompt / P-tuning rows from `virtual_embeddings` before the prompt's embeddings at positions
0..NVT+L-1 (recipe R1); prefix tuning's `prefix_key_values` in a cache, the prompt at positions NVT.. (R2).
The oracle is `PeftModel.from_pretrained(...)` and, for continuations, a greedy loop over its forward
(peft 0.21's `generate` is broken for these methods with transformers 5.x).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import adapters_core as ac
from _oracle import LLAMA_KW, assert_differs, input_ids, tiny_llama
from prompt_folders import KINDS, NVT, greedy, make_prompt_adapter, peft_logits, peft_reference

ATOL = 1e-4


@torch.no_grad()
def our_logits(model, ids, name="default"):
    """R1 / R2 on the plain model with the tensors adapters_core gives."""
    adapter = ac.prompt_adapter(model, name)
    n, (b, length) = adapter.num_virtual_tokens, ids.shape
    if adapter.is_prefix:
        keys, values = ac.prefix_key_values(model, name)                 # [layers, Hkv, NVT, D] each
        cache = transformers.DynamicCache(config=model.config)
        for layer in range(keys.shape[0]):
            cache.update(keys[layer].expand(b, -1, -1, -1), values[layer].expand(b, -1, -1, -1), layer)
        positions = (n + torch.arange(length)).expand(b, -1)
        return model(input_ids=ids, position_ids=positions, cache=cache).logits.float()     # [B, L, V]
    rows = ac.virtual_embeddings(model, name)                            # [NVT, hidden]
    embeds = torch.cat([rows.expand(b, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    positions = torch.arange(n + length).expand(b, -1)
    return model(inputs_embeds=embeds, position_ids=positions).logits.float()    # [B, NVT + L, V]


@pytest.fixture(scope="module")
def base():
    return tiny_llama(seed=0)


@pytest.mark.parametrize("inference_mode", [True, False], ids=["inference", "training"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_and_greedy_match_peft(base, tmp_path, kind, inference_mode):
    make_prompt_adapter(base, kind, inference_mode, tmp_path, seed=len(kind))
    ref = peft_reference(base, tmp_path)
    ours = copy.deepcopy(base)
    ac.load_adapter(ours, str(tmp_path))
    ids = input_ids(batch=2, seq=7, seed=5)
    expected = peft_logits(ref, ids)
    got = our_logits(ours, ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    with torch.no_grad():
        plain = base(input_ids=ids).logits.float()
    assert_differs(got[:, -ids.shape[1]:], plain)
    ours_tokens = greedy(lambda s: our_logits(ours, s), ids)
    assert ours_tokens == greedy(lambda s: peft_logits(ref, s), ids)
    assert ours_tokens != greedy(lambda s: base(input_ids=s).logits, ids)


@pytest.mark.parametrize("kind", ["ptuning_mlp", "ptuning_lstm", "prefix_proj"])
def test_encoder_weights_become_peft_saved_embeddings(base, tmp_path, kind):
    """A checkpoint carrying the encoder's weights (not PEFT's `prompt_embeddings`) is run through the encoder
    at load exactly as PEFT's save computes the tensor it writes."""
    pm = make_prompt_adapter(base, kind, False, tmp_path / "peft", seed=3)
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"]
    encoder = {f"prompt_encoder.default.{k}": v.clone() for k, v in pm.prompt_encoder["default"].state_dict().items()}
    assert any(".mlp_head." in k or ".transform." in k for k in encoder)
    (tmp_path / "enc").mkdir()
    save_file(encoder, str(tmp_path / "enc" / "adapter_model.safetensors"))
    (tmp_path / "enc" / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())
    ours = copy.deepcopy(base)
    ac.load_adapter(ours, str(tmp_path / "enc"))
    got = ac.prompt_adapter(ours, "default").prompt_embeddings
    torch.testing.assert_close(got, saved, atol=1e-6, rtol=0)
    assert not torch.equal(saved, pm.prompt_encoder["default"].embedding.weight.detach())   # really reparameterised


@pytest.mark.parametrize("kind", ["prompt", "ptuning_lstm", "prefix_proj"])
def test_saved_by_us_loads_in_peft(base, tmp_path, kind):
    make_prompt_adapter(base, kind, False, tmp_path / "peft", seed=7)
    ours = copy.deepcopy(base)
    ac.load_adapter(ours, str(tmp_path / "peft"))
    ac.save_adapter(ours, str(tmp_path / "ours"))
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert list(b) == ["prompt_embeddings"] and torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(ours_cfg) <= set(peft_cfg) and ours_cfg["peft_type"] == peft_cfg["peft_type"]
    for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules"):
        assert ours_cfg[key] == peft_cfg[key], key
    ids = input_ids(batch=1, seq=6, seed=2)
    torch.testing.assert_close(peft_logits(peft_reference(base, tmp_path / "ours"), ids),
                               peft_logits(peft_reference(base, tmp_path / "peft"), ids), atol=0, rtol=0)


def test_prefix_layout_is_peft_get_prompt(base, tmp_path):
    """Keys and values per layer, head-major, GQA heads: exactly PEFT's past_key_values."""
    make_prompt_adapter(base, "prefix", True, tmp_path, seed=1)
    ref = peft_reference(base, tmp_path)
    ours = copy.deepcopy(base)
    ac.load_adapter(ours, str(tmp_path))
    keys, values = ac.prefix_key_values(ours, "default")
    kv_heads, head_dim = LLAMA_KW["num_key_value_heads"], LLAMA_KW["hidden_size"] // LLAMA_KW["num_attention_heads"]
    assert keys.shape == values.shape == (LLAMA_KW["num_hidden_layers"], kv_heads, NVT, head_dim)
    with torch.no_grad():
        cache = ref.get_prompt(batch_size=1)
    for layer in range(keys.shape[0]):
        torch.testing.assert_close(cache.layers[layer].keys[0], keys[layer], atol=0, rtol=0)
        torch.testing.assert_close(cache.layers[layer].values[0], values[layer], atol=0, rtol=0)


def _edited(tmp_path, kind, **changes):
    make_prompt_adapter(tiny_llama(seed=0), kind, True, tmp_path, seed=2)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return str(tmp_path)


@pytest.mark.parametrize("kind, changes, field", [
    ("prompt", {"token_dim": 16}, "token_dim"),
    ("prompt", {"num_transformer_submodules": 2}, "num_transformer_submodules"),
    ("prompt", {"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ("prompt", {"num_virtual_tokens": -3}, "num_virtual_tokens"),
    ("ptuning_mlp", {"encoder_reparameterization_type": "GRU"}, "encoder_reparameterization_type"),
    ("prefix", {"num_layers": 3}, "num_layers"),
    ("prefix", {"token_dim": 32, "num_attention_heads": 4}, "token_dim"),
    ("prefix", {"num_attention_heads": 4}, "num_attention_heads"),
    ("prefix", {"num_virtual_tokens": 6}, "prompt_embeddings"),
])
def test_unsupported_settings_raise_naming_the_field(base, tmp_path, kind, changes, field):
    path = _edited(tmp_path, kind, **changes)
    model = copy.deepcopy(base)
    with pytest.raises(ac.AdapterError, match=field):
        ac.load_adapter(model, path)
    assert not getattr(model, "peft_config", {}) and not ac.prompt_adapters(model)


def test_delete_inject_and_trainable(base, tmp_path):
    make_prompt_adapter(base, "prefix_proj", True, tmp_path, seed=4)
    model = copy.deepcopy(base)
    with pytest.raises(ac.AdapterError, match="inference only"):
        ac.load_adapter(model, str(tmp_path), is_trainable=True)
    ac.load_adapter(model, str(tmp_path), adapter_name="p1")
    with pytest.raises(ac.AdapterError, match="already exists"):
        ac.load_adapter(model, str(tmp_path), adapter_name="p1")
    with pytest.raises(ac.UnsupportedFeatureError, match="not injectable"):
        ac.inject_adapter_in_model(ac.load_config(str(tmp_path)), model, "p2")
    ac.delete_adapter(model, "p1")
    assert not ac.prompt_adapters(model) and not model.peft_config
    with pytest.raises(ac.UnknownAdapterError):
        ac.prefix_key_values(model, "p1")
