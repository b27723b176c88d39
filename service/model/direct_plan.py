"""`DirectPlan`: what the direct step found of the model's layers, kept while nothing it read has changed.

A step may run as one C++ call (direct_step.py) only while every layer is what the call was built for: our
Attention / MLP / RMSNorm modules without hooks, each projection a stored-weight `QuantLinear` in its decoder
group, bare or wrapped by an `AdapterLayer` that is neither disabled nor merged nor hooked. Walking those
checks module by module before every step took ~0.4 ms on SmolLM2 (30 layers x 7 projections, and the C++
loop's tables beside them), 3 % of a one-stream F32 token, nearly all of it waiting for memory: the step
before streamed 540 MB of weights through the caches, and each Python object read was a miss (the same walk
repeated at once takes a fifth of the time). So the walk runs once and the plan keeps what it found, with
`watched.generation()` read before the walk: every class whose instances the walk reads counts its changes
(attributes set, submodules, parameters or hooks registered, adapters merged), and the plan is walked again
as soon as the count has moved or the model's list of layers is another. What changes from batch to batch
(the slot table's mapping, which adapters each layer's stack holds) is read every step, by `batch`."""

from __future__ import annotations

import operator
from typing import Optional

from adapters_core import watched
from adapters_core.layer import AdapterLayer

from .quant_linear import QuantGroup, QuantLinear

_PROJECTIONS = (("self_attn", "q_proj", "qkv"), ("self_attn", "k_proj", "qkv"), ("self_attn", "v_proj", "qkv"),
                ("self_attn", "o_proj", "o"), ("mlp", "gate_proj", "gate_up"), ("mlp", "up_proj", "gate_up"),
                ("mlp", "down_proj", "down"))


class LayerWork:
    """One layer's part of a direct step: its groups, stored layers, and the projections whose LoRA deltas
    apply in this step (refilled by `DirectPlan.batch`)."""

    __slots__ = ("layer", "qkv", "gate_up", "o", "down", "qkv_loras", "o_loras", "gate_up_loras", "down_loras")

    def __init__(self, layer):
        self.layer = layer
        self.qkv = self.gate_up = self.o = self.down = None
        self.qkv_loras, self.o_loras, self.gate_up_loras, self.down_loras = [], [], [], []


class DirectPlan:
    """The model's layers as the direct step computes them (`works`), valid while `holds`; the C++ loop's
    tables built from them are kept with it (`tables`, set by direct_step)."""

    def __init__(self, layers: list, generation: int):
        self.layers, self.generation = layers, generation
        self.works = [LayerWork(layer) for layer in layers]
        self.table = None                  # the slot table of the adapter wrappers (one per model)
        self.wrappers, self.lora_lists = [], []       # the AdapterLayers, and the LayerWork list each joins
        self.has_loras = False
        self.tables = None                 # direct_step's _build_native_tables(...), or None (not one shape)
        self.tables_built = False

    def holds(self, layers: list) -> bool:
        """Nothing counted by `watched` has changed since the walk, and `layers` (the model's decoder layers
        now) are the ones walked."""
        return (self.generation == watched.generation() and len(layers) == len(self.layers)
                and all(map(operator.is_, layers, self.layers)))

    def batch(self) -> bool:
        """Fill each layer's LoRA lists for this step's batch; False when an adapter of the batch needs what
        the direct path does not compute (IA3, or LoRA the fused kernel does not take: DoRA, a LoRA bias) or
        the slot table carries no mapping (an adapter applied as "active" outside a mixed batch)."""
        if self.has_loras:
            for w in self.works:
                w.qkv_loras.clear(), w.o_loras.clear(), w.gate_up_loras.clear(), w.down_loras.clear()
            self.has_loras = False
        if not self.wrappers:
            return True
        mapping = self.table.mapping
        if mapping is None:
            return False
        if mapping.all_base:
            return True
        for wrapper, loras in zip(self.wrappers, self.lora_lists):
            st = wrapper.stack
            if st is None:
                continue
            if st.ia3_in is not None or st.ia3_out is not None or (st.lora and not st.fused_lora):
                return False
            if st.lora:
                loras.append(wrapper)
                self.has_loras = True
        return True

    def lora_mapping(self):
        """After `batch`: the mapping of this step's LoRA deltas (the one slot table's), or None when none
        applies in any layer."""
        return self.table.mapping if self.has_loras else None


def build_plan(model, kinds: tuple) -> Optional[DirectPlan]:
    """Walk the model's layers (`kinds`: decoder.py's (Attention, MLP, RMSNorm)); None when a layer is not one
    the direct path computes, whatever the batch."""
    plan = DirectPlan(list(model.model.layers), watched.generation())      # the number first, then the walk
    return plan if all(_walk_layer(plan, w, kinds) for w in plan.works) else None


def _walk_layer(plan: DirectPlan, w: LayerWork, kinds: tuple) -> bool:
    layer = w.layer
    modules = layer._modules
    attn, mlp = modules["self_attn"], modules["mlp"]
    norms = modules["input_layernorm"], modules["post_attention_layernorm"]
    if type(attn) is not kinds[0] or type(mlp) is not kinds[1] or any(type(n) is not kinds[2] for n in norms):
        return False                       # e.g. a norm wrapped by an adapter's modules_to_save
    if any(_hooked(m) for m in (layer, attn, mlp) + norms):
        return False
    w.qkv, w.gate_up = attn.qkv_group, mlp.gate_up_group                   # regrouping replaces them
    if type(w.qkv) is not QuantGroup or type(w.gate_up) is not QuantGroup:
        return False
    groups = {"qkv": w.qkv, "gate_up": w.gate_up, "o": None, "down": None}
    for owner, name, role in _PROJECTIONS:
        base = _stored_base(plan, (attn if owner == "self_attn" else mlp)._modules[name], groups[role],
                            getattr(w, role + "_loras"))
        if base is None:
            return False
        if role in ("o", "down"):
            setattr(w, role, base)
    return True


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _stored_base(plan: DirectPlan, module, group: Optional[QuantGroup], loras: list) -> Optional[QuantLinear]:
    """The stored layer `module` computes with (a member of `group`, or ungrouped when `group` is None), its
    adapter wrapper recorded with the LoRA list it joins in a step; None when it is not one the direct path
    computes."""
    wrapper = module if type(module) is AdapterLayer else None
    base = module._modules["base_layer"] if wrapper is not None else module
    if type(base) is not QuantLinear or _hooked(base):
        return None
    if (base._group is None) if group is not None else (base._group is not None):
        return None
    if group is not None and base._group[0] is not group:
        return None
    if wrapper is None:
        return base
    if wrapper.disabled or wrapper.merged_adapters or _hooked(wrapper):
        return None
    table = wrapper.slot_table
    if table is None or (plan.table is not None and table is not plan.table):
        return None                        # one slot table per model (injection.slot_table)
    plan.table = table
    plan.wrappers.append(wrapper), plan.lora_lists.append(loras)
    return base
