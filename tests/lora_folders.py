"""PEFT-format LoRA folders with random non-zero weights, written by adapters_core from a model of the
tests' own (shared by the end-to-end tests that upload adapters over HTTP)."""
from __future__ import annotations

from pathlib import Path

import torch

import adapters_core as ac


def save_random_lora(model, folder: Path, name: str, seed: int, r: int = 4,
                     targets=("q_proj", "v_proj")) -> Path:
    """Inject a LoRA named `name` (distinct weights per seed, halved to keep outputs sane), save it to
    `folder` in PEFT's format and remove it from `model` again."""
    torch.manual_seed(seed)
    ac.inject_adapter_in_model(ac.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                             init_lora_weights=False), model, name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if f".{name}." in pname:
                p.mul_(0.5)
    ac.save_adapter(model, str(folder), name)
    ac.delete_adapter(model, name)
    return folder


def save_random_lora_of(loaded, folder: Path, name: str, seed: int, r: int = 8,
                        targets=("q_proj", "v_proj", "down_proj")) -> Path:
    """`save_random_lora` on a fresh decoder of `loaded` (a `LoadedModel`, e.g. the default model)."""
    from service.model.decoder import Decoder

    return save_random_lora(Decoder.from_state_dict(loaded.config, loaded.state_dict), folder, name, seed, r, targets)
