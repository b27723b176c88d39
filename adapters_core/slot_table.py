"""`SlotTable`: a model's adapters by global slot, the layers holding each, and the active batch mapping.

Every adapter of a model owns one global slot (slot 0, `BASE`, is the base model), kept in the model-level
table that `model_tree.slot_table(model)` returns. `sync` writes an adapter's tensors into its slot of each
of its layers' `LayerStack`s (stack.py) when they changed since the last write (tracked by tensor identity
and torch's in-place `_version` counters, or, with `check_edits=False`, trusted to change only through
adapters_core's functions, which call `invalidate`), and grows every stack so that any slot indexes it.
`mapping` is the `BatchMapping` of the forward running now (batch.py installs it).
"""

from __future__ import annotations

import operator
from typing import Iterable, Optional

import torch

from .batch_mapping import BatchMapping
from .stack import LayerStack

BASE = "__base__"
_VERSION = operator.attrgetter("_version")


class SlotTable:
    """Global slot numbers of a model's adapters, the layers holding each, and the active batch mapping."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.name_of: dict[int, str] = {}      # the reverse of slot_of, kept so a step never iterates slot_of
        self.layers: dict[str, list] = {}
        self._free: list[int] = []
        self._next = 1
        self._synced: dict[str, Optional[tuple]] = {}   # adapter -> (owner dicts, keys, tensors, versions) at
        #                                         last copy (None: written without recording them, re-copied by a
        #                                         check_edits sync)
        self._ready: dict[str, list] = {}       # adapter -> its layers' `lora_slot_rows`, until its first write
        self.modules: list = []                 # every AdapterLayer / ModulesToSaveWrapper of the model
        self.layouts: dict = {}                 # `prepared`'s layouts by keys, for the tree as it is (every
        #                                         module swap, `model_tree.set_submodule`, empties it)
        self._stack_slots = 0                   # every existing stack holds at least this many slots
        self.mapping: Optional[BatchMapping] = None

    def assign(self, name: str, layers: list, ready: Optional[list] = None) -> int:
        """Give `name` a slot (keeping the one it has) held in `layers`; `ready`: each layer's slot rows
        (`lora_slot_rows`, aligned with `layers`), written as they are at the adapter's first sync."""
        if name not in self.slot_of:
            slot = self._free.pop() if self._free else self._next
            if slot == self._next:
                self._next += 1
            self.name_of[slot] = name
            self.slot_of[name] = slot
        self.layers[name] = layers
        self._synced.pop(name, None)
        self._ready.pop(name, None)
        if ready is not None:
            self._ready[name] = ready
        return self.slot_of[name]

    def release(self, name: str) -> None:
        slot = self.slot_of.pop(name, None)
        self.layers.pop(name, None)
        self._synced.pop(name, None)
        self._ready.pop(name, None)
        if slot is not None:
            self.name_of.pop(slot, None)
            self._free.append(slot)

    def invalidate(self, name: str) -> None:
        self._synced.pop(name, None)
        self._ready.pop(name, None)             # its tensors changed: derive the rows again

    @property
    def num_slots(self) -> int:
        return self._next

    def _entries(self, name: str) -> tuple:
        owners, keys = [], []
        for layer in self.layers[name]:
            for suffix in layer.adapter_parameters(name):
                owner, key = layer.parameter_owner(name, suffix)
                owners.append(owner._parameters)
                keys.append(key)
            if name in layer.lora_magnitude_vector and "weight" in layer.base_layer._parameters:
                owners.append(layer.base_layer._parameters)     # (a stored-format base has no weight parameter)
                keys.append("weight")
        tensors = list(map(dict.get, owners, keys))
        if any(t.is_inference() for t in tensors):
            return None          # inference tensors keep no version counter: re-copy on every batch
        return owners, keys, tensors, list(map(_VERSION, tensors))

    def is_synced(self, name: str) -> bool:
        """True when none of the adapter's tensors was replaced or changed in place since the last copy."""
        entry = self._synced.get(name)
        if entry is None:
            return False
        owners, keys, tensors, versions = entry
        # C-level loops: this runs for every adapter of every mixed batch.
        return list(map(_VERSION, tensors)) == versions and all(map(operator.is_, map(dict.get, owners, keys),
                                                                   tensors))

    @torch.inference_mode(False)
    def sync(self, names: Iterable[str], check_edits: bool = True) -> None:
        """Write every named adapter whose tensors changed into its slot of each of its layers, and make
        every stack long enough that any slot of the table indexes it (as identity where absent).
        `check_edits=False` trusts that the adapters changed only through adapters_core's functions (which
        invalidate what they touch) and skips the scan of every tensor's version counter: that scan reads
        hundreds of Python objects per adapter (420 for a rank-16 adapter on SmolLM2's seven projections),
        ~0.25 ms per adapter per batch measured in a decode step, where caches are cold."""
        for name in names:
            if self.is_synced(name) if check_edits else name in self._synced:
                continue
            slot = self.slot_of[name]
            ready = self._ready.pop(name, None)
            for i, layer in enumerate(self.layers[name]):
                if layer.stack is None:
                    layer.stack = LayerStack(layer)
                layer.stack.write(slot, name, None if ready is None else ready[i])
            # (recording the tensors' versions reads every parameter again: only for a caller that checks them)
            self._synced[name] = self._entries(name) if check_edits else None
        if self._next > self._stack_slots:
            for module in self.modules:
                if getattr(module, "stack", None) is not None:
                    module.stack.reserve(self._next - 1)
            self._stack_slots = self._next
