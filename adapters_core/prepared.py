"""`prepare_adapter` / `attach_prepared`: a LoRA load split into the part that leaves the model alone and the
part that changes it, so a server does the first in a worker thread and only the second between two steps.

`load_adapter` on a serving model runs on the serving thread (it changes the module tree): it walks the
model several times, matches targets, builds two `nn.Linear` per layer on the meta device and assigns the
state dict, ~5-10 ms for a SmolLM2 adapter on q/v, during which no step runs. `prepare_adapter` does all of
that without changing the model: it looks each key's layer up by its path (its targets must already be
wrapped `AdapterLayer`s, as they are once any adapter has targeted them; a path look-up instead of a walk of
the whole tree, done once per key list and kept in the slot table while the tree is unchanged: adapters of one
target set share it), checks every key and shape, and builds each layer's
`lora_A` / `lora_B` modules around the given tensors (no copy: pass `packing.pack_adapter_tensors`'s
output and the stacks read them in place). `attach_prepared` then inserts them: a few dict writes per layer,
straight into the ModuleDicts' entries (what their `add_module` ends in, without its per-entry checks and
attribute look-ups: 0.14 instead of ~1 ms for SmolLM2's 60 q/v layers, on a server's event loop), and the slot
table's bookkeeping. It also computes what each layer's slot will hold (`stack.lora_slot_rows`:
the factors' rows, scale and the fused kernel's table row), so the first step that uses the adapter only
writes them. It covers plain LoRA (any rank, alpha and rank patterns, rsLoRA) without
DoRA, LoRA bias, embeddings or `modules_to_save`; for anything else, or when the tree changed in between,
`prepare_adapter` returns None and the caller uses `load_adapter`. The adapter is attached inactive and
frozen (requires_grad False), as a server's registry wants it; `set_adapter` activates it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterError, AdapterWeightsError
from .layer import AdapterLayer, linear_holding, lora_scaling
from .matching import pattern_value
from .model_tree import NAME_RE, find_module, peft_configs, slot_table
from .stack import lora_scale_rows, lora_slot_rows, plain_factors
from .state_dict import PEFT_PREFIX


@dataclass
class PreparedAdapter:
    name: str
    config: LoraConfig
    layers: list[tuple[AdapterLayer, int, float, nn.Linear, nn.Linear]]   # layer, r, scaling, lora_A, lora_B
    rows: list[tuple]                     # per layer: `stack.lora_slot_rows`, what its slot will hold


def preparable(config, adapter_name: str) -> bool:
    """Whether `prepare_adapter` takes an adapter of this config and name at all: a plain LoRA (no DoRA, bias or
    modules_to_save). It then still needs the model's target layers wrapped already (by an earlier load)."""
    return (isinstance(config, LoraConfig) and not (config.use_dora or config.lora_bias or config.modules_to_save)
            and config.bias == "none" and bool(NAME_RE.match(adapter_name)))


_MAX_LAYOUTS = 64          # per model: target sets x key orders a server sees (more: start again, not grow)


def _float_dtype(weight: torch.Tensor) -> Optional[torch.dtype]:
    return weight.dtype if weight.dtype.is_floating_point else None


def _layout(model: nn.Module, prefix: str, keys: tuple) -> Optional[tuple]:
    """What a plain LoRA state dict's keys (in order) name on `model`, shared by every adapter whose file lists
    the same keys (a server's adapters of one target set): per adapted layer, in key order, (the layer, its path,
    where its lora_A and lora_B sit among the state dict's values, its fan-in, its fan-out, its base weight's
    device and float dtype or None). Kept in the slot table while the tree is unchanged (every module swap goes
    through `model_tree.set_submodule`, which empties that cache; so does an attach that finds a layer gone, for
    a layout built while another thread swapped modules) and the base weights keep their device and dtype: each
    key's layer is looked up and checked once per tree, not once per load (a SmolLM2 adapter on q/v: 120 keys
    parsed and 60 paths walked, ~0.3 ms of a loader's GIL time). None where this path does not apply (a key of
    anything but a factor, a layer not wrapped, or an embedding)."""
    table = slot_table(model)
    layout = table.layouts.get((prefix, keys))
    if layout is not None:
        layer, *_, device, dtype = layout[0]
        weight = layer._modules["base_layer"].weight                     # (the model moved or cast since?)
        if weight.device == device and _float_dtype(weight) == dtype:
            return layout
    pairs: dict[str, list] = {}
    for at, key in enumerate(keys):
        path = key.removeprefix(prefix) if prefix else key
        if path.endswith(".lora_A.weight"):
            pairs.setdefault(path[:-14], [None, None])[0] = at
        elif path.endswith(".lora_B.weight"):
            pairs.setdefault(path[:-14], [None, None])[1] = at
        else:
            return None                   # bias, magnitude, embedding or other keys: the general path
    entries, seen = [], set()
    for path, (a_at, b_at) in pairs.items():
        layer = find_module(model, path)
        if type(layer) is not AdapterLayer or layer.is_embedding or a_at is None or b_at is None or \
                id(layer) in seen:
            return None
        seen.add(id(layer))
        weight = layer._modules["base_layer"].weight
        entries.append((layer, path, a_at, b_at, layer.in_features, layer.out_features, weight.device,
                        _float_dtype(weight)))
    if not entries:
        return None
    if len(table.layouts) >= _MAX_LAYOUTS:
        table.layouts.clear()
    layout = table.layouts[(prefix, keys)] = tuple(entries)
    return layout


def prepare_adapter(model: nn.Module, config, state_dict: dict, adapter_name: str,
                    factor_dtype: Optional[torch.dtype] = None) -> Optional[PreparedAdapter]:
    """Everything of loading `state_dict` (PEFT's keys) as `adapter_name` that leaves `model` unchanged; None
    where this path does not apply (see the module docstring). Raises AdapterError for keys or shapes that
    do not fit. Safe to call in another thread than the one stepping the model. `factor_dtype`: the dtype A
    and B are held in, as `load_adapter`'s (None: the base weight's float dtype, else the checkpoint's)."""
    if not preparable(config, adapter_name):
        return None
    root = model._modules.get("base_model")
    prefix = "" if root is not None and root._modules.get("model") is not None else PEFT_PREFIX
    layout = _layout(model, prefix, tuple(state_dict))
    if layout is None:
        return None
    values = list(state_dict.values())
    ranks, alphas = config.rank_pattern, config.alpha_pattern
    layers, rows = [], []
    for layer, path, a_at, b_at, fan_in, fan_out, device, base_dtype in layout:
        a, b = values[a_at], values[b_at]
        r = pattern_value(ranks, path, config.r) if ranks else config.r
        if a.shape != (r, fan_in) or b.shape != (fan_out, r):                # (torch.Size: a tuple)
            raise AdapterWeightsError(f"{path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                                      f"rank {r} and the layer's {fan_in} -> {fan_out}")
        dtype = base_dtype if base_dtype is not None else a.dtype   # as set_peft_model_state_dict
        if factor_dtype is not None and a.dtype.is_floating_point:
            dtype = factor_dtype
        scaling = lora_scaling(pattern_value(alphas, path, config.lora_alpha) if alphas else config.lora_alpha,
                               r, config.use_rslora)
        if a.dtype != dtype or a.device != device:
            a = a.to(device=device, dtype=dtype)
        if b.dtype != dtype or b.device != device:
            b = b.to(device=device, dtype=dtype)
        a, b, bt = plain_factors(a, b)            # A [r, in], B [out, r] stored as Bt [r, out]
        layers.append((layer, r, scaling, linear_holding(a, requires_grad=False),
                       linear_holding(b, requires_grad=False)))
        rows.append(lora_slot_rows(a, bt, scaling, lora_scale_rows(r, scaling, device), device.type == "cpu"))
    return PreparedAdapter(adapter_name, copy.deepcopy(config), layers, rows)


def attach_prepared(model: nn.Module, prepared: PreparedAdapter) -> bool:
    """Insert a prepared adapter (inactive, frozen); False, with the model unchanged, when its layers are no
    longer all in the model (the caller loads it the general way). Raises AdapterError when the name is taken
    (by an adapter, or by an attribute of torch's ModuleDict, which `add_module` would refuse half-way)."""
    configs = peft_configs(model)
    if prepared.name in configs:
        raise AdapterError(f"adapter {prepared.name!r} already exists; delete it first")
    table = slot_table(model)
    present = {id(m) for m in table.modules}
    if any(id(layer) not in present or layer.slot_table is not table for layer, *_ in prepared.layers):
        table.layouts.clear()           # (one may hold those layers: looked up again by the next prepare)
        return False
    name, dropout = prepared.name, prepared.config.lora_dropout
    holder = prepared.layers[0][0]._modules["lora_A"]
    if hasattr(holder, name) and name not in holder._modules:       # ModuleDict's own: "items", "keys", ...
        raise AdapterError(f"adapter name {name!r} is an attribute of torch's ModuleDict, which holds the "
                           "adapters' modules; choose another")
    if not nn.modules.module._global_module_registration_hooks:     # add_module would only store the entries
        for layer, r, scaling, lin_a, lin_b in prepared.layers:
            layer.register_lora_entries(name, r, scaling, dropout, lin_a, lin_b)
    else:
        for layer, r, scaling, lin_a, lin_b in prepared.layers:
            layer.register_lora(name, r, scaling, dropout)
            layer.lora_A[name] = lin_a
            layer.lora_B[name] = lin_b
    configs[name] = prepared.config
    table.assign(prepared.name, [layer for layer, *_ in prepared.layers], prepared.rows)
    return True

