"""Tiny models and adapter folders for the core tests: a deterministic tiny Llama built from a config
(no hub access) and helpers that write a valid PEFT adapter folder to corrupt in controlled ways."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers

VOCAB = 96
LLAMA_KW = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,
    tie_word_embeddings=False,
)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_KW)).eval()
    torch.random.set_rng_state(state)
    return model


def input_ids(batch: int = 2, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def save_peft_lora(base: torch.nn.Module, directory: Path, seed: int = 0, **lora_kw) -> Path:
    """A valid LoRA adapter folder written by PEFT's save_pretrained, with non-zero B so it has an effect."""
    import peft  # fixture maker only

    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    kw.update(lora_kw)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(directory))
    return Path(directory)


def read_config(directory: Path) -> dict:
    return json.loads((Path(directory) / CONFIG_NAME).read_text())


def write_config(directory: Path, data: dict) -> None:
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(data, indent=2))
