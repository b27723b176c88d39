"""Tiny models and adapter folders for the core tests: a deterministic tiny Llama built from a config
(no hub access), helpers that write a valid PEFT adapter folder to corrupt in controlled ways, and a per-token
model for the mixed-batch tests."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

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


def adapter_tensors(with_bool: bool = False) -> dict[str, torch.Tensor]:
    """An adapter file's worth of tensors of every kind the packing handles: LoRA A / B in fp32 and bf16, LoRA
    embedding A / B in fp16, AdaLoRA B / E, an IA3 vector, an fp64 norm, an empty factor (and a bool one)."""
    g = torch.Generator().manual_seed(0)
    out = {"m.q.lora_A.weight": torch.randn(4, 12, generator=g),
           "m.q.lora_B.weight": torch.randn(10, 4, generator=g),
           "m.v.lora_A.weight": torch.randn(8, 12, generator=g).bfloat16(),
           "m.v.lora_B.weight": torch.randn(6, 8, generator=g).bfloat16(),
           "m.e.lora_embedding_B": torch.randn(6, 4, generator=g).half(),
           "m.e.lora_embedding_A": torch.randn(4, 20, generator=g).half(),
           "m.k.lora_B": torch.randn(8, 3, generator=g),                     # AdaLoRA
           "m.k.lora_E": torch.randn(3, 1, generator=g),
           "m.ia3.ia3_l": torch.randn(12, generator=g),
           "m.norm.weight": torch.randn(12, generator=g).double(),
           "m.empty.lora_A.weight": torch.zeros(0, 12)}
    if with_bool:
        out["m.flag"] = torch.tensor([True, False, True])
    return out


def read_config(directory: Path) -> dict:
    return json.loads((Path(directory) / CONFIG_NAME).read_text())


def write_config(directory: Path, data: dict) -> None:
    (Path(directory) / CONFIG_NAME).write_text(json.dumps(data, indent=2))


class PerTokenModel(nn.Module):
    """A per-token model (no attention): a token's output depends only on its id and its adapter."""

    def __init__(self, vocab=50, d=16, hidden=24):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.q_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, hidden)
        self.down_proj = nn.Linear(hidden, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        x = x + torch.tanh(self.q_proj(x))
        x = x + self.down_proj(torch.relu(self.up_proj(x)))
        return self.lm_head(x)
