"""Adapter state dicts in PEFT's key format, both directions.

`get_peft_model_state_dict` returns what PEFT returns for a model injected without `PeftModel`: keys such
as `model.layers.0.self_attn.q_proj.lora_A.weight` (adapter name removed), DoRA magnitudes as
`...lora_magnitude_vector`, AdaLoRA as `...lora_A` / `lora_E` / `lora_B`, base biases for `bias="all"` /
`"lora_only"`, full copies of `modules_to_save`, and the full embedding weights when an embedding layer is
targeted (PEFT's `save_embedding_layers="auto"`). `set_peft_model_state_dict` accepts those keys, with or
without the `base_model.model.` prefix of files saved by PeftModel, checks every shape before it writes
anything, and reports keys that fit no module as unexpected.
"""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

from .errors import AdapterWeightsError
from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .packing import is_factor_tensor
from .management import _check_known
from .matching import EMBEDDING_LAYER_NAMES
from .model_tree import adapter_layers, peft_configs, slot_table, walk
from .prompt_learning import PROMPT_KEY

PEFT_PREFIX = "base_model.model."


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _adapter_slots(model: nn.Module, adapter_name: str) -> dict[str, tuple[nn.Module, str, torch.Tensor, tuple]]:
    """On-disk key (no prefix) -> (owner module, attribute, current tensor, (device, dtype) of the base it
    adapts; dtype None where the base stores a non-float weight, a quantized one) for every tensor of the
    adapter."""
    slots = {}
    for path, module in walk(model):
        if isinstance(module, AdapterLayer) and adapter_name in module.kind:
            weight = module.base_layer.weight
            target = (weight.device, weight.dtype if weight.dtype.is_floating_point else None)
            for suffix, tensor in module.adapter_parameters(adapter_name).items():
                owner, attr = module.parameter_owner(adapter_name, suffix)
                slots[f"{path}.{suffix}"] = (owner, attr, tensor, target)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            copy = module.modules_to_save[adapter_name]
            for key, tensor in copy.state_dict(keep_vars=True).items():
                module_path, _, attr = key.rpartition(".")
                owner = copy.get_submodule(module_path) if module_path else copy
                slots[f"{path}.{key}"] = (owner, attr, tensor, (tensor.device, tensor.dtype))
    return slots


def _embedding_is_targeted(config) -> bool:
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        return any(re.fullmatch(targets, f"x.{e}") or re.fullmatch(targets, e) for e in EMBEDDING_LAYER_NAMES)
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def get_peft_model_state_dict(model: nn.Module, state_dict: Optional[dict] = None,
                              adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (no `base_model.model.` prefix, no adapter name)."""
    _check_known(model, [adapter_name])
    prompt = model.__dict__.get("_prompt_adapters", {}).get(adapter_name)
    if prompt is not None:                  # prompt learning: PEFT saves the one encoder output
        return {PROMPT_KEY: prompt.prompt_embeddings}
    config = peft_configs(model)[adapter_name]
    model_state = model.state_dict() if state_dict is None else state_dict
    out: dict[str, torch.Tensor] = {}
    internal = _internal_keys(model, adapter_name) if state_dict is not None else {}
    for key, (_, _, tensor, _) in _adapter_slots(model, adapter_name).items():
        out[key] = model_state.get(internal.get(key, ""), tensor.detach())
    bias = getattr(config, "bias", "none")
    if bias == "all":
        others = [n for n in peft_configs(model) if n != adapter_name]
        for key, value in model_state.items():
            if "bias" in key and not any(f".{o}." in key or key.endswith(f".{o}") for o in others) \
                    and ".modules_to_save." not in key and ".original_module." not in key:
                out.setdefault(_remove_adapter_name(key, adapter_name), value)
    elif bias == "lora_only":
        for path, layer in adapter_layers(model):
            if adapter_name in layer.kind and getattr(layer.base_layer, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = model_state[f"{path}.base_layer.bias"]
    if _embedding_is_targeted(config):
        out.update(_embedding_base_weights(model, model_state, adapter_name))
    return out


def _embedding_base_weights(model: nn.Module, model_state: dict, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT's `save_embedding_layers="auto"`: the full base weights of a targeted input/output embedding.
    Like PEFT, only models that expose `get_input_embeddings` (transformers-style) are handled."""
    if not hasattr(model, "get_input_embeddings"):
        return {}
    found = {}
    by_id = {id(m): n for n, m in walk(model)}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if not isinstance(module, AdapterLayer) or adapter_name not in module.kind:
            continue
        key = f"{by_id[id(module)]}.base_layer.weight"
        if key in model_state:
            found[key] = model_state[key]
    return found


def _remove_adapter_name(key: str, adapter_name: str) -> str:
    if key.endswith(f".{adapter_name}"):
        return key.removesuffix(f".{adapter_name}")
    return key.replace(f".{adapter_name}.", ".")


def _internal_keys(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """On-disk key -> the model's own state-dict key for the same tensor."""
    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    return {key: names.get(id(t), "") for key, (_, _, t, _) in _adapter_slots(model, adapter_name).items()}


@torch.inference_mode(False)
def set_peft_model_state_dict(model: nn.Module, peft_model_state_dict: dict, adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False,
                              factor_dtype: Optional[torch.dtype] = None) -> IncompatibleKeys:
    """Load PEFT-format tensors into adapter `adapter_name`; return missing and unexpected keys.

    `factor_dtype` (not PEFT's): hold the tensors of the low-rank products (`packing.is_factor_tensor`: LoRA /
    AdaLoRA A, B, E, LoRA B's bias) in this dtype instead of PEFT's choice (the base weight's float dtype, else
    the checkpoint's), e.g. a server's adapter dtype; the adapter's other tensors follow PEFT's rule."""
    _check_known(model, [adapter_name])
    has_prefix = any(n.startswith(PEFT_PREFIX) for n, _ in walk(model))
    slots = _adapter_slots(model, adapter_name)
    # Also accept keys that still carry the adapter name (`...lora_A.default.weight`), as PEFT does.
    aliases = {}
    for key in slots:
        head, _, last = key.rpartition(".")
        aliases[f"{key}.{adapter_name}"] = key
        aliases[f"{head}.{adapter_name}.{last}"] = key
        if key.endswith(".lora_magnitude_vector"):
            aliases[f"{key}.weight"] = key
            aliases[f"{key}.{adapter_name}.weight"] = key
    base_params = None                 # built only if a key is not an adapter tensor (rare)

    plan, unexpected, mismatched = [], [], []
    for raw_key, value in peft_model_state_dict.items():
        key = raw_key if has_prefix else raw_key.removeprefix(PEFT_PREFIX)
        key = aliases.get(key, key)
        if not isinstance(value, torch.Tensor):
            raise AdapterWeightsError(f"value for {raw_key!r} is not a tensor")
        if value.is_inference():
            value = value.clone()     # never let an inference tensor become a parameter
        if key in slots:
            owner, attr, current, target = slots[key]
        else:
            if base_params is None:
                base_params = dict(model.state_dict(keep_vars=True))
            if key not in base_params:
                unexpected.append(key)
                continue
            module_path, _, attr = key.rpartition(".")
            owner, current, target = model.get_submodule(module_path), base_params[key], None
            target = (current.device, current.dtype)
        if tuple(current.shape) != tuple(value.shape):
            mismatched.append((raw_key, tuple(value.shape), tuple(current.shape)))
            continue
        plan.append((key, owner, attr, current, value, target))
    if mismatched:
        detail = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched)
        if not ignore_mismatched_sizes:
            raise AdapterWeightsError(f"tensor shapes do not fit the base model: {detail}")
        warnings.warn(f"Skipping tensors with mismatched shapes: {detail}")

    loaded = set()
    with torch.no_grad():
        for key, owner, attr, current, value, (device, dtype) in plan:
            held = factor_dtype if (factor_dtype is not None and key in slots and value.dtype.is_floating_point
                                    and is_factor_tensor(key)) else None
            if current.device.type == "meta" or low_cpu_mem_usage and key in slots or (
                    held is not None and held != current.dtype):
                # As PEFT (`load_state_dict(assign=True)`, then `_move_adapter_to_device_of_base_layer`):
                # cast to a float base weight's dtype, but over a quantized base keep the checkpoint's (a bf16
                # adapter stays bf16); a tensor already right is taken as it is, without a copy.
                if held is not None:
                    dtype = held
                elif dtype is None:
                    dtype = value.dtype if low_cpu_mem_usage else current.dtype
                if not (dtype.is_floating_point and value.dtype.is_floating_point):
                    dtype = value.dtype
                new = nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=current.requires_grad)
                if isinstance(owner, nn.ParameterDict):
                    owner[attr] = new
                else:
                    setattr(owner, attr, new)
            else:
                current.copy_(value)
            loaded.add(key)
    slot_table(model).invalidate(adapter_name)
    missing = [k for k in slots if k not in loaded]
    return IncompatibleKeys(missing, unexpected)

