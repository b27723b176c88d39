"""Adapter bookkeeping on a model: which are active, enabling, deleting, casting dtypes (PEFT's semantics).

`set_adapter` makes the named adapters the active ones in every layer (unmerging first, as PEFT does);
`delete_adapter` removes an adapter everywhere, frees its slot and drops every reference to its tensors,
and, if it was active, leaves PEFT's choice active (the other active ones, else the first remaining name).
`cast_adapter_dtype` is PeftModel's upcast; `cast_adapter_factors` (not PEFT's) holds an adapter's low-rank
factors in a server's adapter dtype.
"""

from __future__ import annotations

import warnings
from typing import Union

import torch
from torch import nn

from .errors import UnknownAdapterError
from .layer import AdapterLayer
from .model_tree import peft_configs, slot_table, wrapped_modules
from .packing import is_factor_tensor
from .prompt_learning import remove_prompt_adapter

_LOW_PRECISION = tuple(getattr(torch, n) for n in ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
                       if hasattr(torch, n))


def _check_known(model: nn.Module, names: list[str]) -> None:
    configs = peft_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise UnknownAdapterError(f"unknown adapter(s) {unknown}; the model holds {sorted(configs)}")


def _layer_set_adapter(layer: AdapterLayer, names: list[str], inference_mode: bool) -> None:
    if layer.merged_adapters:
        warnings.warn("Adapters were merged; unmerging them before switching the active adapter.")
        layer.unmerge()
    # Only adapters whose state changes are touched (inactive ones are already frozen), so switching
    # costs the same with 1 or 1,000 adapters on the layer.
    for name in set(layer.active_adapters) | set(names):
        if name in layer.kind:
            for p in layer.adapter_parameters(name).values():
                p.requires_grad_(name in names and not inference_mode)
    layer.active_adapters = list(names)


def set_adapter(model: nn.Module, adapter_name: Union[str, list[str]], inference_mode: bool = False) -> None:
    """Make `adapter_name` (a name or a list) the active adapter(s) of every layer."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    _check_known(model, names)
    for module in wrapped_modules(model):
        if isinstance(module, AdapterLayer):
            _layer_set_adapter(module, names, inference_mode)
            continue
        module.set_adapter(names)
        for name, copy in module.modules_to_save.items():
            copy.requires_grad_(name in names and not inference_mode)
    model.__dict__["_active_adapters"] = names


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("_active_adapters", []))


def enable_adapters(model: nn.Module) -> None:
    for module in wrapped_modules(model):
        module.disabled = False


def disable_adapters(model: nn.Module) -> None:
    """Run the base model only (merged adapters are unmerged on the next forward, as in PEFT)."""
    for module in wrapped_modules(model):
        module.disabled = True


def delete_adapter(model: nn.Module, adapter_name: str) -> list[str]:
    """Remove `adapter_name` from the model; return the new active adapters."""
    _check_known(model, [adapter_name])
    modules = wrapped_modules(model)
    layers = [m for m in modules if isinstance(m, AdapterLayer)]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge it before deleting")
    new_active = None
    for layer in layers:
        if adapter_name not in layer.kind:
            continue
        was_active = adapter_name in layer.active_adapters
        layer.remove_adapter(adapter_name)
        if was_active and not layer.active_adapters:
            remaining = sorted(layer.kind)
            if remaining:
                warnings.warn(f"Adapter {adapter_name} was active and is now deleted. Setting active adapter to "
                              f"{remaining[0]}.")
                _layer_set_adapter(layer, remaining[:1], inference_mode=False)
        if new_active is None:
            new_active = list(layer.active_adapters)
    for wrapper in modules:
        if not isinstance(wrapper, AdapterLayer):
            wrapper.remove(adapter_name)
    slot_table(model).release(adapter_name)
    remove_prompt_adapter(model, adapter_name)
    del peft_configs(model)[adapter_name]
    active = [a for a in active_adapters(model) if a != adapter_name]
    model.__dict__["_active_adapters"] = new_active if new_active is not None else active
    return list(model.__dict__["_active_adapters"])


@torch.inference_mode(False)
def cast_adapter_dtype(model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
    """Upcast the adapter's float16 / bfloat16 / float8 tensors to float32 (PeftModel's autocast)."""
    if not autocast_adapter_dtype:
        return
    _check_known(model, [adapter_name])
    for layer in wrapped_modules(model):
        if not isinstance(layer, AdapterLayer) or adapter_name not in layer.kind:
            continue
        for suffix, param in layer.adapter_parameters(adapter_name).items():
            if param.dtype in _LOW_PRECISION:
                param.data = param.data.to(torch.float32)
    slot_table(model).invalidate(adapter_name)


@torch.inference_mode(False)
def cast_adapter_factors(model: nn.Module, adapter_name: str, dtype: torch.dtype) -> None:
    """Hold the adapter's LoRA / AdaLoRA factor tensors (`packing.is_factor_tensor`) in `dtype`, in place, as
    `load_adapter(factor_dtype=dtype)` would have loaded them; its other tensors keep their dtype."""
    _check_known(model, [adapter_name])
    for layer in wrapped_modules(model):
        if not isinstance(layer, AdapterLayer) or adapter_name not in layer.kind:
            continue
        for suffix, param in layer.adapter_parameters(adapter_name).items():
            if is_factor_tensor(f".{suffix}") and param.dtype.is_floating_point and param.dtype != dtype:
                param.data = param.data.to(dtype)
    slot_table(model).invalidate(adapter_name)
