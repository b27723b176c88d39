"""Helpers for the differential tests against PEFT: a tiny Llama, adapters made and saved by PEFT with
non-trivial weights, and small utilities to find adapter parameters and compare logits.

PEFT is the oracle here: every adapter used by the compat tests is created by PEFT itself
(`get_peft_model` + `save_pretrained`), so the files on disk are exactly what a user would bring.
"""
from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
import transformers  # noqa: F401  (fixtures build transformers models)

from tiny_llama import LLAMA_KW, VOCAB, tiny_llama  # noqa: F401  (re-exported to the compat tests)

ATOL = 1e-5


def input_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def _segments(name: str) -> list[str]:
    return name.split(".")


def is_adapter_segment(segment: str) -> bool:
    """PEFT's containers (`lora_A`, `lora_embedding_B`, `ia3_l`, ...) and look-alikes such as `adalora_E`."""
    return "lora_" in segment or segment.startswith("ia3_")


def adapter_params(model: torch.nn.Module, adapter: str, kind: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters of `adapter` (in-model naming `...<container>.<adapter>[.weight]` as in PEFT, where the
    container may be PEFT's `lora_B` or a renamed one like `adalora_B`), optionally only those whose name
    contains `kind` (e.g. "lora_B", "ia3_l")."""
    out = []
    for n, p in model.named_parameters():
        segs = _segments(n)
        if adapter not in segs:
            continue
        if kind is not None and kind not in n:
            continue
        if not any(is_adapter_segment(s) for s in segs) or "ranknum" in n:
            continue
        out.append((n, p))
    return out


@torch.no_grad()
def randomize_adapter_(model: torch.nn.Module, adapter: str = "default", seed: int = 0) -> int:
    """Give an adapter non-trivial weights in place: IA3 vectors 1 + 0.1*N(0,1), LoRA A/B 0.2*N(0,1),
    AdaLoRA A/B 0.2*N(0,1) and E N(0,1). Returns how many tensors were changed."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    for n, p in adapter_params(model, adapter):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if "ia3_" in n:
            p.copy_(1.0 + 0.1 * noise)
        elif "lora_E" in n:
            p.copy_(noise)
        elif "lora_magnitude_vector" in n:
            p.copy_(p.float() * (1.0 + 0.1 * noise))
        else:
            p.copy_(0.2 * noise)
        count += 1
    assert count > 0, f"no parameters found for adapter {adapter!r}"
    return count


def make_peft_adapter(base: torch.nn.Module, config, directory: Path, seed: int = 0) -> peft.PeftModel:
    """Wrap a deepcopy of `base` with `config` in PEFT, randomise the adapter, save it to `directory`.
    Returns the (eval) PEFT model, whose outputs are the reference for that adapter alone."""
    pm = peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    randomize_adapter_(pm, "default", seed=seed)
    pm.eval()
    pm.save_pretrained(str(directory))
    assert (Path(directory) / "adapter_config.json").is_file()
    return pm


def find_adapter_dir(directory: Path, adapter_name: str) -> Path:
    """PEFT writes non-default adapters to `<dir>/<name>/`; accept either layout from save_adapter."""
    directory = Path(directory)
    if (directory / "adapter_config.json").is_file():
        return directory
    sub = directory / adapter_name
    assert (sub / "adapter_config.json").is_file(), f"no adapter_config.json under {directory}"
    return sub


def base_weight_view(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's base weights keyed by their original names (".base_layer" segments removed), adapter
    tensors left out; lets us compare base weights of a wrapped model with those of the plain model."""
    out = {}
    for k, v in model.state_dict().items():
        segs = _segments(k)
        if any(is_adapter_segment(s) or s == "ranknum" for s in segs):
            continue
        out[".".join(s for s in segs if s != "base_layer")] = v
    return out


def assert_differs(a: torch.Tensor, b: torch.Tensor, min_diff: float = 1e-3) -> None:
    """Sanity guard: the adapter must actually change the output, otherwise an equality check proves nothing."""
    diff = (a.float() - b.float()).abs().max().item()
    assert diff > min_diff, f"outputs differ by only {diff:.3g}; the check would be vacuous"


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)
