"""Copies of the base model's own weights inside an adapter file, which a shared base must never take.

PEFT saves some of the base model's tensors with an adapter: the embedding and output layers' weights when
LoRA targets them (`save_embedding_layers="auto"`: `...embed_tokens.base_layer.weight`,
`...lm_head.base_layer.weight`, or plain `...embed_tokens.weight` when the vocabulary grew), and the
biases that `bias="all"` / `"lora_only"` trains (`...q_proj.base_layer.bias`, `...k_proj.bias`). PEFT
loads them into its model, which is that adapter's alone; here one base model serves every adapter, so
loading them would change every other adapter's answers and the base model's (and deleting the adapter
would not undo it). Each copy is therefore checked against the served model when the adapter is registered
(`check_base_copies`): the same shape, and values equal within the rounding of the format the served weight
is held in (`TOLERANCE`: the relative Frobenius difference a bf16 copy of an fp32 weight, or a 4-bit block
quantization of the original, stays well under), so the copy is the served base's own and is left out of
every load (`is_base_copy`; the stored file keeps it). A copy that differs (an adapter trained on another
base, or biases that `bias="all"` trained) is refused with a 422 naming the tensor: such an adapter cannot
be served as trained on a shared base. Tensors the adapter owns (LoRA / AdaLoRA factors, DoRA magnitudes,
IA3 vectors, `modules_to_save` copies) are never base copies.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

import adapters_core as ac
from adapters_core.layer import dense_weight
from adapters_core.state_dict import PEFT_PREFIX

from .errors import Invalid

# the segments of a key that name a tensor the adapter owns
ADAPTER_SEGMENTS = frozenset({"lora_A", "lora_B", "lora_E", "lora_embedding_A", "lora_embedding_B",
                              "lora_magnitude_vector", "ia3_l", "ranknum", "modules_to_save"})
# largest relative Frobenius difference between a copy and the served weight, by the served weight's format:
# dense and 16-bit formats hold the original or its bf16 / fp16 rounding (a bf16 copy of fp32 weights is
# ~0.001 apart); 8-bit ~0.0075; Q6_K ~0.02; 4-bit blocks ~0.09-0.12 (measured with gguf's quantizers)
TOLERANCE = {"dense": 2 ** -8, "F32": 2 ** -8, "F16": 2 ** -8, "BF16": 2 ** -8, "I8": 0.03, "Q8_0": 0.03,
             "Q6_K": 0.06, "Q4_0": 0.3, "Q4_1": 0.3, "Q4_K": 0.3}


def _mts_names(config: ac.AdapterConfig) -> tuple[str, ...]:
    names = getattr(config, "modules_to_save", None) or ()
    return (names,) if isinstance(names, str) else tuple(names)


def is_base_copy(config: ac.AdapterConfig, key: str) -> bool:
    """Whether `key` (a PEFT key, with or without `base_model.model.`) holds a copy of a base model tensor:
    a `base_layer` weight or bias, or a plain weight or bias of a module the adapter does not keep a copy of
    (`modules_to_save`). Prompt-learning adapters hold no such keys."""
    if isinstance(config, ac.PromptLearningConfig):
        return False
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    if ADAPTER_SEGMENTS.intersection(parts) or parts[-1] not in ("weight", "bias"):
        return False
    if "base_layer" in parts:
        return True
    module = ".".join(parts[:-1])
    return not any(module == name or module.endswith("." + name) for name in _mts_names(config))


def split_base_copies(config: ac.AdapterConfig, tensors: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the adapter's own tensors, the base copies)."""
    own, copies = {}, {}
    for key, value in tensors.items():
        (copies if is_base_copy(config, key) else own)[key] = value
    return own, copies


# the ends of the keys of a plain LoRA's factors: never base copies (`is_base_copy`: their segment is the adapter's)
FACTOR_KEY_ENDS = (".lora_A.weight", ".lora_B.weight")


def without_base_copies(config: ac.AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` less the base copies: the dict itself when every key is a LoRA factor's (one `endswith` a key,
    where `is_base_copy` on each of a served file's 120 keys was ~0.1 ms of a load's GIL time), else the adapter's
    own part of `split_base_copies`."""
    if all(key.endswith(FACTOR_KEY_ENDS) for key in tensors):
        return tensors
    return split_base_copies(config, tensors)[0]


def serving_config(config: ac.AdapterConfig) -> ac.AdapterConfig:
    """The config as served: a LoRA `bias` of "all" / "lora_only" becomes "none", since the biases it saved are
    base copies checked equal to the served ones (nothing of the adapter's own to hold; PEFT's rule of one
    such adapter per model then does not apply). Other configs as they are."""
    if isinstance(config, ac.LoraConfig) and getattr(config, "bias", "none") != "none":
        config = copy.copy(config)
        config.bias = "none"
    return config


def _served(model: nn.Module, key: str) -> tuple[Optional[torch.Tensor], str]:
    """The served tensor a copy's key names (dense, fp32 for stored formats) and its format; None if the base
    model has no such tensor."""
    parts = [p for p in key.removeprefix(PEFT_PREFIX).split(".") if p != "base_layer"]
    path, attr = ".".join(parts[:-1]), parts[-1]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None, "dense"
    if isinstance(module, ac.AdapterLayer):
        module = module.base_layer
    elif isinstance(module, ac.ModulesToSaveWrapper):
        module = module.original_module
    stored = getattr(module, "stored", None)
    fmt = stored.format if stored is not None else "dense"
    if attr == "bias":
        return getattr(module, "bias", None), "dense"
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None, fmt
    return dense_weight(module), fmt


def check_base_copies(model: nn.Module, copies: dict[str, torch.Tensor], weights_name: str) -> None:
    """Each copy must be the served model's own tensor (shape, and values within the served format's
    rounding); else `Invalid` (422) naming the first one at fault."""
    for key, value in copies.items():
        served, fmt = _served(model, key)
        name = key.removeprefix(PEFT_PREFIX)
        if served is None:
            raise Invalid(f"{weights_name}: tensor {key!r} fits no module of the base model ({name} does not exist)")
        if tuple(value.shape) != tuple(served.shape):
            raise Invalid(f"{weights_name}: tensor {key!r} is a copy of the base model's {name} of shape "
                          f"{tuple(value.shape)}, but the served one is {tuple(served.shape)} (a resized vocabulary "
                          f"or another base model); one base model serves every adapter here")
        with torch.no_grad():
            reference = served.detach().to(torch.float32)
            norm = float(torch.linalg.vector_norm(reference))
            gap = float(torch.linalg.vector_norm(value.detach().to(torch.float32) - reference))
        relative = gap / norm if norm > 0 else gap
        limit = TOLERANCE.get(fmt, TOLERANCE["Q4_1"])
        if not relative <= limit:
            raise Invalid(f"{weights_name}: tensor {key!r} holds the base model's {name} (PEFT saves it with "
                          f"save_embedding_layers or bias='all'/'lora_only'), and it differs from the served "
                          f"model's by {relative:.3g} (relative), more than the served {fmt} weights' rounding "
                          f"({limit:g}): the adapter was trained on another base model or trains the base's own "
                          f"weights or biases; on a base model shared by every adapter it cannot be served as "
                          f"trained")
