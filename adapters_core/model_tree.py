"""The adapter state a model carries, and the walks over its module tree that every adapters_core verb uses.

`slot_table(model)` (the model-level `SlotTable`, `model._adapter_slots`) and `peft_configs(model)`
(`model.peft_config`, name -> config) are created on first use; `walk` is `named_modules()` without descending
into adapter wrappers, and `find_module` looks one dotted path up the same way; `adapter_layers` / `wrappers`
list the `AdapterLayer`s and `ModulesToSaveWrapper`s; `wrapped_modules` is the same two kinds from the slot
table's list, without a walk; `set_submodule` swaps a module in by its dotted name; `NAME_RE` is what an
adapter name may look like. These
live apart from injection.py so that injection (which makes a new adapter active) and management.py (which
activates, deletes and casts) can both use them without importing each other in a circle.
"""

from __future__ import annotations

import re

from torch import nn

from .config import AdapterConfig
from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .slot_table import SlotTable

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")


def slot_table(model: nn.Module) -> SlotTable:
    table = model.__dict__.get("_adapter_slots")
    if table is None:
        table = SlotTable()
        model.__dict__["_adapter_slots"] = table
    return table


def peft_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    configs = getattr(model, "peft_config", None)
    if configs is None:
        configs = {}
        model.peft_config = configs
    return configs


_WRAPPERS = (AdapterLayer, ModulesToSaveWrapper)     # modules whose children are adapter internals


def walk(model: nn.Module):
    """`named_modules()` that does not descend into adapter wrappers: their children are adapter internals,
    and walking them would make every model-level call (and so every load) slower with each adapter."""
    seen = set()

    def visit(prefix: str, module: nn.Module):
        if id(module) in seen:
            return
        seen.add(id(module))
        yield prefix, module
        if isinstance(module, _WRAPPERS):
            return
        for name, child in module._modules.items():
            if child is not None:
                yield from visit(f"{prefix}.{name}" if prefix else name, child)

    yield from visit("", model)


def find_module(model: nn.Module, path: str):
    """The module at dotted `path` as `walk` reaches it (not inside an adapter wrapper), or None: one dict
    look-up per part instead of a walk over every module (~0.5 ms of each adapter a server prepares)."""
    module = model
    for part in path.split("."):
        if isinstance(module, _WRAPPERS):
            return None
        module = module._modules.get(part)
        if module is None:
            return None
    return module


def adapter_layers(model: nn.Module):
    return [(n, m) for n, m in walk(model) if isinstance(m, AdapterLayer)]


def wrappers(model: nn.Module):
    return [(n, m) for n, m in walk(model) if isinstance(m, ModulesToSaveWrapper)]


def wrapped_modules(model: nn.Module) -> list:
    """The model's `AdapterLayer`s and `ModulesToSaveWrapper`s from the slot table's list (injection appends
    every wrapper it makes; its undo paths and `unload` take them out again), for the verbs that visit each
    of them but need no paths: a `walk` of SmolLM2's ~400 modules was ~1.5 ms of each `set_adapter` and
    `delete_adapter`, which a server runs for every adapter it evicts."""
    table = model.__dict__.get("_adapter_slots")
    return list(table.modules) if table is not None else []


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Swap `module` in at dotted `name`, dropping what the slot table keeps of the tree as it was
    (`prepared`'s layouts)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    slot_table(model).layouts.clear()
