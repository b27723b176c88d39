"""Merging adapters into base weights, removing them, and combining LoRA adapters (PEFT's merge family).

`merge_adapter` folds adapters into the base layers' weights (W += delta, IA3 W *= l, DoRA rescaled);
`unmerge_adapter` subtracts them again; `merge_and_unload` / `unload` return the plain model without
wrappers; `add_weighted_adapter` builds a new LoRA adapter from existing ones ("linear", "cat", "svd", and
PEFT's task-arithmetic family "ties", "dare_linear", "dare_ties", "magnitude_prune" of task_arithmetic.py).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .config import AdaLoraConfig, LoraConfig
from .errors import AdapterError
from .injection import inject_adapter_in_model
from .management import _check_known, active_adapters, set_adapter
from .model_tree import adapter_layers, peft_configs, set_submodule, slot_table, wrappers
from .task_arithmetic import FACTOR_STRATEGIES, check_strategy, combine_factors


def merge_adapter(model: nn.Module, adapter_names: Optional[list[str]] = None) -> None:
    names = active_adapters(model) if adapter_names is None else list(adapter_names)
    _check_known(model, names)
    for _, layer in adapter_layers(model):
        layer.merge(names)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def _strip(model: nn.Module, merge: bool, adapter_names: Optional[list[str]]) -> nn.Module:
    if merge:
        merge_adapter(model, adapter_names)
    for key, layer in adapter_layers(model):
        set_submodule(model, key, layer.base_layer)
    for key, wrapper in wrappers(model):
        keep = wrapper.modules_to_save[wrapper.active_adapter] if (merge and wrapper.active_adapter) else None
        set_submodule(model, key, keep if keep is not None else wrapper.original_module)
    for attr in ("peft_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    for attr in ("_adapter_slots", "_active_adapters", "_prompt_adapters"):
        model.__dict__.pop(attr, None)
    return model


def merge_and_unload(model: nn.Module, adapter_names: Optional[list[str]] = None) -> nn.Module:
    """Merge the active (or named) adapters into the base weights and return the model without adapters."""
    return _strip(model, True, adapter_names)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the plain model. As in PEFT, weights merged earlier stay merged."""
    return _strip(model, False, None)


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         density: Optional[float] = None, majority_sign_method: str = "total",
                         generator: Optional[torch.Generator] = None) -> None:
    """Create LoRA adapter `adapter_name` as a weighted combination of existing LoRA adapters, as PEFT's
    `add_weighted_adapter` does. `density` (ties, dare_*, magnitude_prune) is the fraction of each factor's
    entries kept; `majority_sign_method` (ties, dare_ties) elects signs by `total` or `frequency`; DARE's
    random drops come from `generator` (torch's global generator when None, as in PEFT)."""
    configs = peft_configs(model)
    _check_known(model, adapters)
    if len(adapters) != len(weights):
        raise AdapterError("adapters and weights must have the same length")
    for a in adapters:
        if type(configs[a]) is not LoraConfig or isinstance(configs[a], AdaLoraConfig):
            raise AdapterError(f"add_weighted_adapter combines LoRA adapters only; {a!r} is not one")
    wrapped = [w for _, w in wrappers(model) if sum(a in w.modules_to_save for a in adapters) > 1]
    if wrapped:
        raise AdapterError("cannot combine adapters that target the same module with modules_to_save")
    combination_type = "linear" if len(adapters) == 1 else combination_type
    ranks = [c.r if not c.rank_pattern else max(c.r, *c.rank_pattern.values())
             for c in (configs[a] for a in adapters)]
    if combination_type in FACTOR_STRATEGIES:
        if len(set(ranks)) != 1:
            raise AdapterError(f"all adapters must have the same r for combination_type {combination_type} "
                               f"(got ranks {ranks})")
        check_strategy(combination_type, density, majority_sign_method)
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    elif combination_type == "svd":
        new_rank = svd_rank or max(ranks)
    else:
        raise AdapterError(f"combination_type {combination_type!r} is not supported "
                           f"({', '.join(FACTOR_STRATEGIES + ('cat', 'svd'))})")
    kinds = {type(configs[a].target_modules) for a in adapters}
    if len(kinds) > 1:
        raise AdapterError("all adapters must give target_modules the same way (all lists or all strings)")
    if isinstance(configs[adapters[0]].target_modules, str):
        targets = "|".join(f"({configs[a].target_modules})" for a in adapters)
    else:
        targets = sorted(set().union(*(set(configs[a].target_modules) for a in adapters)))
    new_config = dataclasses.replace(configs[adapters[0]], r=new_rank, lora_alpha=new_rank,
                                     target_modules=targets, alpha_pattern={}, rank_pattern={})
    if combination_type in FACTOR_STRATEGIES:      # `rank_pattern` may give one module a rank `r` does not say
        for path, layer in adapter_layers(model):
            kept = {a: layer.lora_factors(a)[0].shape[0] for a in adapters if layer.kind.get(a) == "LORA"}
            if kept and set(kept.values()) != {new_rank}:
                raise AdapterError(f"combination_type {combination_type} combines the factors module by module and "
                                   f"needs one rank in every module; {path} has ranks {kept}")
    previous_active = active_adapters(model)
    inject_adapter_in_model(new_config, model, adapter_name)
    if previous_active:              # injecting made the new adapter active; PEFT keeps the previous ones
        set_adapter(model, previous_active)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if adapter_name not in layer.kind:
                continue
            a_new, b_new, _ = layer.lora_factors(adapter_name)
            present = [(a, w) for a, w in zip(adapters, weights) if layer.kind.get(a) == "LORA"]
            if not present:
                raise AdapterError(f"no adapter of {adapters} targets a layer of the new adapter")
            if combination_type == "cat":
                a_cat = torch.cat([layer.lora_factors(a)[0] * w * layer.scaling[a] for a, w in present], dim=0)
                b_cat = torch.cat([layer.lora_factors(a)[1] for a, _ in present], dim=1)
                a_new.zero_()
                b_new.zero_()
                a_new[: a_cat.shape[0]] = a_cat
                b_new[:, : b_cat.shape[1]] = b_cat
            elif combination_type in FACTOR_STRATEGIES:
                factors = [layer.lora_factors(a)[:2] + (layer.scaling[a],) for a, _ in present]
                a_merged, b_merged = combine_factors(combination_type, factors, [w for _, w in present], density,
                                                     majority_sign_method, generator)
                a_new.copy_(a_merged)
                b_new.copy_(b_merged)
            else:
                delta = sum(layer.get_delta_weight(a) * w for a, w in present)
                if layer.fan_in_fan_out or layer.is_embedding:
                    delta = delta.T
                u, s, vh = torch.linalg.svd(delta, full_matrices=True)
                u = u[:, :new_rank] @ torch.diag(s[:new_rank])
                a_new.copy_(vh[:new_rank, :])
                b_new.copy_(u)
    slot_table(model).invalidate(adapter_name)
