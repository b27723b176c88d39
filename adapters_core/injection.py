"""`inject_adapter_in_model`: walk any torch module, wrap every targeted layer, register the adapter.

Follows PEFT's `BaseTuner.inject_adapter`: expand `"all-linear"`, match names by `matching.py`'s rules
(or take the targets from a state dict's keys), wrap each match in an `AdapterLayer` (or add to the one
already there), wrap `modules_to_save`, make the new adapter the only active one, freeze the base. Nothing
in the model changes until every target has been checked, so a bad config leaves the model as it was.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from .config import AdaLoraConfig, AdapterConfig, IA3Config, LoraConfig
from .errors import AdapterError, ModuleConflictError, TargetNotFoundError, UnsupportedFeatureError
from .layer import AdapterLayer
from .management import set_adapter
from .matching import expand_all_linear, is_feedforward, is_supported_base, is_target, pattern_value
from .model_tree import NAME_RE, peft_configs, set_submodule, slot_table, walk, wrappers
from .modules_to_save import ModulesToSaveWrapper
from .prompt_config import PromptLearningConfig
from .slot_table import BASE, SlotTable

# PEFT's defaults when a config names no target_modules (a subset of its per-model_type tables).
DEFAULT_TARGETS = {
    "LORA": {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
             "gpt2": ["c_attn"]},
    "IA3": {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
            "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
            "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
            "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])},
}
STATE_DICT_PREFIX = {"LORA": "lora_", "ADALORA": "lora_", "IA3": "ia3_"}


def _fill_default_targets(config: AdapterConfig, model: nn.Module) -> None:
    if config.target_modules is not None:
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = DEFAULT_TARGETS["IA3" if isinstance(config, IA3Config) else "LORA"]
    if model_type not in table:
        raise AdapterError("target_modules is not set and there is no default for this model type "
                           f"({model_type!r}); name the modules to adapt")
    if isinstance(config, IA3Config):
        config.target_modules, ff = (list(v) for v in table[model_type])
        if config.feedforward_modules is None:
            config.feedforward_modules = ff
    else:
        config.target_modules = list(table[model_type])


def _targets_from_state_dict(state_dict: dict, prefix: str) -> set[str]:
    return {k.rsplit(f".{prefix}", 1)[0] for k in state_dict if f".{prefix}" in k}


def _adalora_ranks(config: AdaLoraConfig, adapter_name: str) -> dict[str, int]:
    """Module name -> rank after the rank allocator's shrink, from `rank_pattern` masks."""
    ranks = {}
    for key, mask in (config.rank_pattern or {}).items():
        key = key.removeprefix("base_model.model.")
        parts = key.split(".")
        module = ".".join(parts[:-2]) if parts[-1] == adapter_name else ".".join(parts[:-1])
        ranks[module] = int(sum(bool(b) for b in mask))
    return ranks


@torch.inference_mode(False)
def inject_adapter_in_model(config: AdapterConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> nn.Module:
    """Add adapter `adapter_name` described by `config` to `model` in place; return `model`."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a LoraConfig, IA3Config or AdaLoraConfig, got {type(config).__name__}")
    if isinstance(config, PromptLearningConfig):
        raise UnsupportedFeatureError(f"{config.peft_type} adapters are not injectable into a torch module: they add "
                                      f"virtual tokens; load them with load_adapter")
    if adapter_name == BASE or not NAME_RE.match(adapter_name or ""):
        raise AdapterError(f"invalid adapter name {adapter_name!r}: use letters, digits, '_' and '-'")
    configs = peft_configs(model)
    if adapter_name in configs:
        raise AdapterError(f"adapter {adapter_name!r} already exists; delete it first")
    config = copy.deepcopy(config)
    is_lora = isinstance(config, LoraConfig)
    if is_lora and config.bias != "none":
        others = [n for n, c in configs.items() if getattr(c, "bias", "none") != "none"]
        if others:
            raise AdapterError(f"only one adapter may have bias != 'none'; {others[0]!r} already does")

    modules = list(walk(model))
    if state_dict is not None:
        targets = _targets_from_state_dict(state_dict, STATE_DICT_PREFIX[config.peft_type])
        matches = lambda key: key in targets  # noqa: E731
    else:
        _fill_default_targets(config, model)
        expand_all_linear(config, model, modules)
        matches = lambda key: is_target(config, key)  # noqa: E731

    table = slot_table(model)
    chosen = []
    for key, module in modules:
        if not key or not matches(key):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            holders = list(module.modules_to_save)
            if holders:
                raise ModuleConflictError(f"module {key!r} holds the modules_to_save copies of adapter(s) "
                                          f"{holders}; adapter {adapter_name!r} cannot adapt it beside them", holders)
            module = _unwrap(model, key, module, table)          # a wrapper left empty: the module itself
        if not (isinstance(module, AdapterLayer) or is_supported_base(module)):
            raise UnsupportedFeatureError(
                f"module {key!r} ({type(module).__name__}) matches the targets but adapters_core supports only "
                f"Linear, Conv1D and Embedding layers")
        if isinstance(config, IA3Config) and isinstance(getattr(module, "base_layer", module), nn.Embedding):
            raise UnsupportedFeatureError(f"IA3 does not support Embedding layers ({key!r})")
        chosen.append((key, module))
    if not chosen:
        raise TargetNotFoundError(
            f"target modules {config.target_modules!r} matched no module of the model "
            f"(e.g. {[n for n, _ in modules[1:6]]})")

    ranks = _adalora_ranks(config, adapter_name) if isinstance(config, AdaLoraConfig) else {}
    layers, done = [], []
    try:
        for key, module in chosen:
            layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module).train(module.training)
            _add_to_layer(layer, config, key, adapter_name, low_cpu_mem_usage, ranks)
            done.append((key, module, layer))
            if layer is not module:
                _install(model, key, layer, table)
            layers.append(layer)
        for target in config.modules_to_save or ():
            _wrap_modules_to_save(model, target, adapter_name, table)
    except Exception:
        _roll_back(model, adapter_name, done)
        raise

    configs[adapter_name] = config
    table.assign(adapter_name, layers)
    _freeze_base(modules)
    set_adapter(model, adapter_name, inference_mode=config.inference_mode)
    return model


@torch.inference_mode(False)
def wrap_target_layers(model: nn.Module, config: AdapterConfig) -> int:
    """Wrap the layers an adapter of `config` would adapt in `AdapterLayer`s that hold no adapter; return how
    many were wrapped now (0 where all already were). Such a wrapper computes its base layer's output, as one
    left by a deleted adapter does. A server wraps at start the layers its stored adapters target (vLLM
    replaces its LoRA-capable layers when it builds the model), so that even a first load finds them and is
    prepared in a worker thread (`prepared.prepare_adapter`) instead of changing the module tree between two
    steps. Embedding layers and modules_to_save are left to the loads (so is a config matching nothing: its
    load says why); nothing is frozen and no adapter is added. Raises AdapterError for a config naming no
    targets on a model type with no default."""
    if not isinstance(config, AdapterConfig) or isinstance(config, PromptLearningConfig):
        return 0
    config = copy.deepcopy(config)
    modules = list(walk(model))
    _fill_default_targets(config, model)
    expand_all_linear(config, model, modules)
    chosen = [(key, module) for key, module in modules
              if key and not isinstance(module, (AdapterLayer, ModulesToSaveWrapper, nn.Embedding))
              and is_supported_base(module) and is_target(config, key)]
    table = slot_table(model)
    for key, module in chosen:
        _install(model, key, AdapterLayer(module).train(module.training), table)
    return len(chosen)


def _install(model: nn.Module, key: str, wrapper: nn.Module, table: SlotTable) -> None:
    """Put a new adapter wrapper (`AdapterLayer` or `ModulesToSaveWrapper`) in place of the module at `key`."""
    wrapper.slot_table = table
    set_submodule(model, key, wrapper)
    table.modules.append(wrapper)


def _unwrap(model: nn.Module, key: str, wrapper: nn.Module, table: SlotTable) -> nn.Module:
    """Put back the module an adapter wrapper holds no adapter on any more; returns that module."""
    original = wrapper.base_layer if isinstance(wrapper, AdapterLayer) else wrapper.original_module
    set_submodule(model, key, original)
    table.modules = [m for m in table.modules if m is not wrapper]
    return original


def conflicting_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The adapters on `model` that an adapter of `config` cannot share it with (`ModuleConflictError`): those
    whose modules_to_save copies sit on a module it would adapt, and those adapting a module it would copy.
    Walks the model only when either side has modules_to_save (rare); [] otherwise."""
    if isinstance(config, PromptLearningConfig):
        return []
    copies = config.modules_to_save or ()
    copies = (copies,) if isinstance(copies, str) else tuple(copies)
    if not copies and not any(isinstance(m, ModulesToSaveWrapper) for m in slot_table(model).modules):
        return []
    targets = copy.deepcopy(config)
    try:
        _fill_default_targets(targets, model)
    except AdapterError:
        return []                       # (its injection says why)
    holders: list[str] = []
    for key, module in walk(model):
        if isinstance(module, ModulesToSaveWrapper) and targets.target_modules != "all-linear" \
                and is_target(targets, key):
            holders += [n for n in module.modules_to_save if n not in holders]
        elif isinstance(module, AdapterLayer) and any(key.endswith(t) for t in copies):
            holders += [n for n in module.kind if n not in holders]
    return holders


def _roll_back(model: nn.Module, adapter_name: str, done: list) -> None:
    """Undo a half-finished injection so a failure leaves the model as it was."""
    table = slot_table(model)
    for key, module, layer in done:
        layer.remove_adapter(adapter_name)
        if layer is not module:
            set_submodule(model, key, module)
            table.modules = [m for m in table.modules if m is not layer]
    for key, wrapper in wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            wrapper.remove(adapter_name)
            if not len(wrapper.modules_to_save):
                set_submodule(model, key, wrapper.original_module)
                table.modules = [m for m in table.modules if m is not wrapper]


def unwrap_modules_since(model: nn.Module, count: int) -> None:
    """Put back the original modules of every wrapper created after the table held `count` of them (used
    to undo a failed load completely, state-dict keys included)."""
    table = slot_table(model)
    new = table.modules[count:]
    if not new:
        return
    paths = {id(m): n for n, m in walk(model)}
    for module in new:
        original = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
        if id(module) in paths:
            set_submodule(model, paths[id(module)], original)
    del table.modules[count:]


def _freeze_base(modules: list) -> None:
    """requires_grad=False on every parameter that is not an adapter's (PEFT's `_mark_only_adapters...`)."""
    for _, module in modules:
        if isinstance(module, AdapterLayer):
            module.base_layer.requires_grad_(False)
        elif isinstance(module, ModulesToSaveWrapper):
            module.original_module.requires_grad_(False)
        else:
            for param in module._parameters.values():
                if param is not None:
                    param.requires_grad_(False)


def _add_to_layer(layer: AdapterLayer, config: AdapterConfig, key: str, name: str, meta: bool,
                  ranks: dict[str, int]) -> None:
    if isinstance(config, AdaLoraConfig):
        r = ranks.get(key, config.init_r)
        layer.add_adalora(name, r, config.init_r, config.lora_alpha, config.lora_dropout,
                          config.init_lora_weights, meta)
    elif isinstance(config, LoraConfig):
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = pattern_value(config.alpha_pattern, key, config.lora_alpha)
        if layer.is_embedding and config.lora_bias:
            raise UnsupportedFeatureError("lora_bias is not supported on Embedding layers")
        layer.add_lora(name, r, alpha, config.lora_dropout, config.use_rslora, config.use_dora,
                       config.lora_bias, config.init_lora_weights, meta)
    else:
        layer.add_ia3(name, is_feedforward(config, key), config.init_ia3_weights, meta)


def _wrap_modules_to_save(model: nn.Module, target: str, adapter_name: str, table: SlotTable) -> None:
    found = False
    for key, module in list(walk(model)):
        if not key.endswith(target):
            continue
        if isinstance(module, AdapterLayer):
            holders = [n for n in module.kind if n != adapter_name]
            if holders:
                raise ModuleConflictError(f"module {key!r} is adapted by adapter(s) {holders}; adapter "
                                          f"{adapter_name!r} cannot keep a modules_to_save copy of it beside them",
                                          holders)
            if module.kind:
                continue                                          # adapted by this adapter itself
            module = _unwrap(model, key, module, table)          # a layer left without adapters
        found = True
        if isinstance(module, ModulesToSaveWrapper):
            module.add(adapter_name)
        else:
            _install(model, key, ModulesToSaveWrapper(module, adapter_name), table)
    if not found:
        raise TargetNotFoundError(f"modules_to_save entry {target!r} matches no module of the model")

