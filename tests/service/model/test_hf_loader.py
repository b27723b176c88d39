"""load_hf_folder / load_hub / load_model on tiny transformers models saved with save_pretrained: the state dict
and config must be transformers' own, whatever the weight layout (single file, shards, .bin, prefixed keys)."""

import json
import shutil

import pytest
import torch

from service.model import ModelConfig, Tokenizer, load_hf_folder, load_hub, load_model
from service.model.hf_loader import normalize_keys

from _model_fixtures import (TEXTS, gguf_metadata, our_gguf_tokenizer, random_model, tiny_llama_config,
                             tiny_qwen2_config)

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIGS = {
    "llama": lambda: tiny_llama_config(),
    "llama-biases": lambda: tiny_llama_config(attention_bias=True, mlp_bias=True, head_dim=16,
                                              eos_token_id=[2, 0]),
    "qwen2": lambda: tiny_qwen2_config(),
}


def save_folder(model, folder, **save_kwargs):
    """save_pretrained plus the SmolLM2 GGUF tokenizer as tokenizer.json and a tokenizer_config.json."""
    model.save_pretrained(folder, **save_kwargs)
    our_gguf_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "TokenizersBackend", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
              "chat_template": gguf_metadata()["tokenizer.chat_template"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def hf_state_dict(model):
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def assert_same_state_dict(ours, reference):
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_folder_state_dict_and_config_are_transformers(tmp_path, kind):
    model = random_model(CONFIGS[kind]())
    loaded = load_hf_folder(str(save_folder(model, tmp_path / kind)))
    assert_same_state_dict(loaded.state_dict, hf_state_dict(model))
    c, ref = loaded.config, model.config
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(c, field) == getattr(ref, field), field
    assert c.head_dim == getattr(ref, "head_dim", ref.hidden_size // ref.num_attention_heads)
    assert c.rope_theta == ref.rope_parameters["rope_theta"] and c.rope_scaling is None
    has = set(loaded.state_dict)
    assert c.attention_bias == ("model.layers.0.self_attn.q_proj.bias" in has)
    assert c.o_proj_bias == ("model.layers.0.self_attn.o_proj.bias" in has)
    assert c.mlp_bias == ("model.layers.0.mlp.up_proj.bias" in has)
    assert ("lm_head.weight" in has) == (not c.tie_word_embeddings)
    assert loaded.name == kind
    assert loaded.chat_template == gguf_metadata()["tokenizer.chat_template"]


def test_qwen2_has_qkv_bias_but_no_o_bias(tmp_path):
    loaded = load_hf_folder(str(save_folder(random_model(tiny_qwen2_config()), tmp_path / "q")))
    assert (loaded.config.attention_bias, loaded.config.o_proj_bias) == (True, False)
    assert "model.layers.1.self_attn.v_proj.bias" in loaded.state_dict
    assert "model.layers.1.self_attn.o_proj.bias" not in loaded.state_dict


def test_sharded_index(tmp_path):
    model = random_model(tiny_llama_config())
    folder = save_folder(model, tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (folder / "model.safetensors").exists()
    assert_same_state_dict(load_hf_folder(str(folder)).state_dict, hf_state_dict(model))


def test_bin_weights_load_with_weights_only(tmp_path):
    model = random_model(tiny_llama_config())
    folder = save_folder(model, tmp_path / "bin")
    (folder / "model.safetensors").unlink()
    # an old-style save: bare keys, a rotary buffer, as transformers v4 wrote for some models
    weights = {k.removeprefix("model."): v.clone() for k, v in model.state_dict().items()}
    weights["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(weights, folder / "pytorch_model.bin")
    assert_same_state_dict(load_hf_folder(str(folder)).state_dict, hf_state_dict(model))


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_bin_with_arbitrary_objects_is_refused(tmp_path):
    folder = save_folder(random_model(tiny_llama_config()), tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(32), "x": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        load_hf_folder(str(folder))


def test_key_prefix_variants_normalise():
    config = ModelConfig.from_hf_dict(tiny_llama_config(tie_word_embeddings=True).to_dict())
    t = torch.zeros(1)
    keys = {"model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
            "layers.1.input_layernorm.weight": "model.layers.1.input_layernorm.weight",
            "base_model.model.model.norm.weight": "model.norm.weight",
            "language_model.model.embed_tokens.weight": "model.embed_tokens.weight",
            "model.layers.0.self_attn.rotary_emb.inv_freq": None, "lm_head.weight": None}
    out = normalize_keys({k: t for k in keys}, config)
    assert set(out) == {v for v in keys.values() if v}
    untied = ModelConfig.from_hf_dict(tiny_llama_config().to_dict())
    assert "lm_head.weight" in normalize_keys({"base_model.model.lm_head.weight": t}, untied)
    with pytest.raises(ValueError, match="both map"):
        normalize_keys({"norm.weight": t, "model.norm.weight": t}, untied)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    model = random_model(tiny_llama_config())
    folder = save_folder(model, tmp_path / "broken")
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    sd["model.norm.weight"] = torch.ones(7)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: model.layers.1.mlp.up_proj.weight.*wrong shapes: model.n"):
        load_hf_folder(str(folder))


def test_tokenizer_generation_config_and_template_files(tmp_path):
    model = random_model(tiny_llama_config(eos_token_id=[2, 0]))
    folder = save_folder(model, tmp_path / "tok")
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    loaded = load_hf_folder(str(folder))
    assert loaded.chat_template == "{{ messages[0]['content'] }}"  # the .jinja file wins, as in transformers
    assert loaded.generation_config["eos_token_id"] == [2, 0]
    tok = loaded.tokenizer
    assert tok.eos_token_ids == {0, 2} and tok.eos_token_id == 2 and tok.bos_token_id == 1
    reference = our_gguf_tokenizer()
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(text), text


def test_folder_tokenizer_matches_transformers_on_the_same_folder(tmp_path):
    from transformers import AutoTokenizer

    folder = save_folder(random_model(tiny_llama_config()), tmp_path / "tok")
    ours, theirs = load_hf_folder(str(folder)).tokenizer, AutoTokenizer.from_pretrained(str(folder))
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_add_bos_token_in_tokenizer_config_prepends_bos(tmp_path):
    folder = save_folder(random_model(tiny_llama_config()), tmp_path / "bos")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = load_hf_folder(str(folder)).tokenizer
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1


def test_tokenizer_larger_than_embedding_is_refused(tmp_path):
    folder = save_folder(random_model(tiny_llama_config(vocab_size=1000)), tmp_path / "small")
    with pytest.raises(ValueError, match="49152 tokens but the model embeds only 1000"):
        load_hf_folder(str(folder))


def test_generation_config_defaults_to_the_config_ids(tmp_path):
    folder = save_folder(random_model(tiny_llama_config()), tmp_path / "nogen")
    (folder / "generation_config.json").unlink()
    assert load_hf_folder(str(folder)).generation_config == {"bos_token_id": 1, "eos_token_id": 2}


def test_dtype_casts_floats(tmp_path):
    folder = save_folder(random_model(tiny_llama_config()), tmp_path / "bf16")
    loaded = load_model(str(folder), dtype=torch.bfloat16)
    assert {t.dtype for t in loaded.state_dict.values()} == {torch.bfloat16}


# -- config.json rules ---------------------------------------------------------------------------------------

def test_config_rejects_unsupported_features_by_name():
    base = tiny_llama_config().to_dict()
    for bad, match in [({"model_type": "gemma2"}, "gemma2"), ({"hidden_act": "gelu"}, "gelu"),
                       ({"quantization_config": {"quant_method": "gptq"}}, "gptq"),
                       ({"rope_parameters": {"rope_type": "mrope", "rope_theta": 1.0}}, "mrope")]:
        with pytest.raises(ValueError, match=match):
            ModelConfig.from_hf_dict({**base, **bad})
    mistral = {**base, "model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_hf_dict(mistral)
    assert ModelConfig.from_hf_dict({**mistral, "max_position_embeddings": 4096}).model_type == "mistral"
    assert ModelConfig.from_hf_dict({**mistral, "sliding_window": None}).max_position_embeddings == 32768
    qwen = tiny_qwen2_config().to_dict()
    assert ModelConfig.from_hf_dict({**qwen, "sliding_window": 64}).attention_bias  # use_sliding_window is off
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_hf_dict({**qwen, "sliding_window": 64, "layer_types": ["full_attention", "sliding_attention"]})
    v4_qwen = {k: v for k, v in qwen.items() if k != "layer_types"}
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_hf_dict({**v4_qwen, "sliding_window": 64, "use_sliding_window": True, "max_window_layers": 1})


def test_config_reads_both_rope_layouts():
    base = {k: v for k, v in tiny_llama_config().to_dict().items() if k != "rope_parameters"}
    v4 = ModelConfig.from_hf_dict({**base, "rope_theta": 500000.0, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert v4.rope_theta == 500000.0
    assert v4.rope_scaling == {"type": "llama3", "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    v5 = ModelConfig.from_hf_dict({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                               "original_max_position_embeddings": 32768}})
    assert v5.rope_theta == 1e6
    assert v5.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    plain = ModelConfig.from_hf_dict({**base, "rope_scaling": {"rope_type": "default"}})
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0


def test_config_from_transformers_v5_config_with_rope_scaling():
    from transformers import LlamaConfig

    ref = LlamaConfig(hidden_size=32, num_attention_heads=4, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 12345.0})
    c = ModelConfig.from_hf_dict(ref.to_dict())
    assert c.rope_theta == 12345.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


# -- hub ids and load_model routing ------------------------------------------------------------------------------

def _fake_cache(cache, repo_id, folder, revision="main", commit=COMMIT):
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


def test_hub_repo_id_loads_from_the_offline_cache(tmp_path, offline_cache):
    model = random_model(tiny_llama_config())
    folder = save_folder(model, tmp_path / "src")
    _fake_cache(offline_cache, "someone/tiny-llama", folder)
    loaded = load_hub("someone/tiny-llama")
    assert loaded.name == "someone/tiny-llama"
    assert_same_state_dict(loaded.state_dict, hf_state_dict(model))
    via_spec = load_model("someone/tiny-llama")
    assert_same_state_dict(via_spec.state_dict, hf_state_dict(model))


def test_hub_revision_selects_the_snapshot(tmp_path, offline_cache):
    main, other = random_model(tiny_llama_config()), random_model(tiny_qwen2_config())
    _fake_cache(offline_cache, "someone/tiny", save_folder(main, tmp_path / "main"))
    _fake_cache(offline_cache, "someone/tiny", save_folder(other, tmp_path / "other"), revision="v2",
                commit="fedcba9876543210fedcba9876543210fedcba98")
    assert load_hub("someone/tiny", revision="v2").config.model_type == "qwen2"
    assert load_model("someone/tiny@v2").config.model_type == "qwen2"
    assert load_model("someone/tiny").config.model_type == "llama"


def test_unknown_repo_id_offline_is_a_clear_error(offline_cache):
    with pytest.raises(FileNotFoundError, match="nobody/missing"):
        load_hub("nobody/missing")


def test_load_model_routes_each_spec(tmp_path, monkeypatch):
    from service.model import loader

    calls = []
    monkeypatch.setattr(loader, "default_model_path", lambda: "/default.gguf")
    monkeypatch.setattr(loader, "load_gguf", lambda path, dtype, keep_stored: calls.append(("gguf", path, dtype,
                                                                                              keep_stored)))
    monkeypatch.setattr(loader, "load_hf_folder", lambda path, dtype: calls.append(("folder", path, dtype)))
    monkeypatch.setattr(loader, "load_hub", lambda repo, revision, dtype: calls.append(("hub", repo, revision)))
    load_model(None)
    load_model(str(tmp_path / "x.GGUF"), dtype=torch.float16, keep_stored=True)
    load_model(str(tmp_path))
    load_model("org/name@abc")
    assert calls == [("gguf", "/default.gguf", torch.float32, False),
                     ("gguf", str(tmp_path / "x.GGUF"), torch.float16, True),
                     ("folder", str(tmp_path), None), ("hub", "org/name", "abc")]
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(str(tmp_path / "missing"))


def test_tokenizer_save_and_from_file_round_trip(tmp_path):
    ours = our_gguf_tokenizer()
    ours.save(str(tmp_path / "tokenizer.json"))
    again = Tokenizer.from_file(str(tmp_path / "tokenizer.json"), {"eos_token": {"content": "<|im_end|>"}})
    assert again.eos_token_id == 2 and again.bos_token_id is None
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)
