"""A tiny random Llama as our Decoder (weights from transformers' model), with LoRA and IA3 adapters."""
from __future__ import annotations


import torch
import transformers

import adapters_core as ac
from service.model.config import ModelConfig
from service.model.decoder import Decoder

HF_KW = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.2, max_position_embeddings=256)


def config_of(hf: transformers.PretrainedConfig) -> ModelConfig:
    return ModelConfig.from_hf_dict(hf.to_dict())


def tiny_decoder(seed: int = 0, adapters: bool = True) -> Decoder:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**HF_KW)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    model = Decoder.from_state_dict(config_of(hf_config), hf.state_dict())
    if adapters:
        for i in range(4):
            cfg = ac.LoraConfig(r=2 + 2 * i, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                init_lora_weights=False)
            ac.inject_adapter_in_model(cfg, model, f"lora{i}")
        ac.inject_adapter_in_model(ac.IA3Config(target_modules=["k_proj", "down_proj"],
                                                feedforward_modules=["down_proj"], init_ia3_weights=False),
                                   model, "ia3")
        model.eval()
    torch.random.set_rng_state(state)
    return model


def prompt(i: int, length: int) -> list[int]:
    return torch.randint(0, HF_KW["vocab_size"], (length,), generator=torch.Generator().manual_seed(i)).tolist()
