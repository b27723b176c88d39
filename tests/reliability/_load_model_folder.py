"""A small random Llama written as a real Hugging Face model folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json), so a server process starts in about a second.

The tokenizer is byte-level BPE without merges (one token per byte) plus an end-of-text token; the EOS row of
`lm_head` is zero so greedy decoding of random weights practically never stops early, which keeps requests
running for as many steps as a test asks for."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from service.model.config import ModelConfig
from service.model.loaded import expected_shapes
from service.model.tokenizer import bytes_to_unicode

EOS = "<|endoftext|>"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def write_tiny_model(folder: Path, hidden: int = 128, layers: int = 4, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    eos_id = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([EOS])
    backend.save(str(folder / "tokenizer.json"))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": eos_id + 8,
              "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "eos_token_id": eos_id, "hidden_act": "silu", "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_id}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS, "chat_template": CHAT_TEMPLATE}))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in expected_shapes(ModelConfig.from_hf_dict(config)).items():
        tensors[key] = (torch.ones(shape) if key.endswith("norm.weight")
                        else torch.randn(shape, generator=generator) * 0.1)
    tensors["lm_head.weight"][eos_id] = 0        # greedy never picks EOS: requests run to max_tokens
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
