"""Tiny models and adapter folders for the core tests: a deterministic tiny Llama built from a config
(no hub access) and helpers that write a valid PEFT adapter folder to corrupt in controlled ways."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from tiny_llama import LLAMA_KW, VOCAB, tiny_llama  # noqa: F401  (re-exported to the core tests)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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
