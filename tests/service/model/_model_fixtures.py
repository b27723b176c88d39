"""Shared helpers for the model-loading tests: the default GGUF and transformers' view of it (each loaded once
per test process), varied texts, tiny transformers models, and a tiny-GGUF writer that stores tensors the way
llama.cpp's `convert_hf_to_gguf.py` does (Q/K rows permuted for the llama architecture)."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from service.model import Tokenizer, default_model_path

TEXTS = [
    "Hello world! How are you today?",
    "Café naïve résumé — déjà vu, Ångström, façade.",
    "日本語のテキストと中文字符，还有한국어 문장。",
    "مرحبا بالعالم، كيف حالك؟",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦 plus a flag 🏳️‍🌈.",
    "Spaces:    four, then\ttab\t\ttabs and\n\nnewlines\n\n\n  indented\r\nwindows",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "Numbers 3.14159, 1,000,000 and 2024-12-31; version v1.2.3; 0xFF.",
    "Total:  42 items,\t7 tabs,\n\n9 lines and ٣٤ in Arabic digits.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing spaces  ",
    "",
    "Mixed: I'm, you're, they've, we'll, it'd — don't! ¿Qué? «Ça va» ½ ² ³",
]


def gguf_path() -> str:
    return default_model_path()


@lru_cache(maxsize=None)
def gguf_reader():
    from gguf import GGUFReader

    return GGUFReader(gguf_path())


@lru_cache(maxsize=None)
def gguf_metadata() -> dict:
    return {key: field.contents() for key, field in gguf_reader().fields.items()}


@lru_cache(maxsize=None)
def our_gguf_tokenizer(pre_tokenizer: str | None = None) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_metadata(), pre_tokenizer=pre_tokenizer)


@lru_cache(maxsize=None)
def hf_gguf_tokenizer():
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@lru_cache(maxsize=None)
def our_gguf_model():
    """`load_gguf` of the default model, once per test process."""
    from service.model import load_gguf

    return load_gguf(gguf_path())


@lru_cache(maxsize=None)
def hf_gguf_model():
    """transformers' `LlamaForCausalLM` from the same GGUF (fp32), once per test process."""
    from transformers import AutoModelForCausalLM

    path = gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=50000.0,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_qwen2_config(**overrides):
    from transformers import Qwen2Config

    kwargs = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
                  rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def random_model(config):
    """A transformers causal LM with every weight random (norms and biases too, so no tensor is trivially 1 or 0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return model.eval()


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """`LlamaModel.permute` from llama.cpp's convert_hf_to_gguf.py, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A small byte-level vocabulary: 3 control tokens, the 256 byte characters, two merged tokens."""
    from service.model.tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values()) + ["Ġt", "Ġth"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, types, ["Ġ t", "Ġt h"]


def write_tiny_gguf(path: str, arch: str, config, state_dict: dict[str, torch.Tensor],
                    quant: dict[str, "object"], add_bos: bool = False) -> dict[str, np.ndarray]:
    """Write `state_dict` as llama.cpp would; `quant` maps HF names to a GGMLQuantizationType (default F32).

    Returns, per HF name, what a faithful reader must give back: the stored values after the file's own
    rounding (dequantised with gguf), in Hugging Face's layout."""
    import gguf
    from gguf import GGMLQuantizationType as T

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    tokens, types, merges = byte_level_vocab()
    padding = config.vocab_size - len(tokens)  # llama.cpp pads the list to the embedding rows with unused tokens
    tokens, types = tokens + [f"[PAD{i}]" for i in range(padding)], types + [5] * padding
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}")
    expected = {}
    for name, tensor in state_dict.items():
        data = tensor.detach().float().numpy()
        if arch == "llama" and ".q_proj." in name:
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        qtype = quant.get(name, T.F32)
        if qtype == T.F32:
            stored, back = data.astype(np.float32), data.astype(np.float32)
            writer.add_tensor(gguf_name(name), stored)
        elif qtype == T.F16:
            stored = data.astype(np.float16)
            back = stored.astype(np.float32)
            writer.add_tensor(gguf_name(name), stored)
        else:
            stored = gguf.quants.quantize(data, qtype)
            back = gguf.quants.dequantize(stored, qtype)
            writer.add_tensor(gguf_name(name), stored, raw_dtype=qtype)
        expected[name] = back  # still in the file's (permuted) row order
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # undo llama.cpp's permute by tracking row indices through it, independently of the loader's unpermute
    for name, back in expected.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            permuted_idx = llama_cpp_permute(np.arange(back.shape[0]), heads, heads)  # HF row held by each stored row
            restored = np.empty_like(back)
            restored[permuted_idx] = back
            expected[name] = restored
    return expected


def random_peft_lora(hf_model, seed: int = 0, scale: float = 0.05, **config):
    """A peft LoRA model over a deep copy of `hf_model`, every LoRA parameter random (seeded), in eval mode:
    an adapter that visibly changes the logits, for comparisons with our decoder."""
    import copy

    import peft
    import torch

    pm = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return pm.eval()

