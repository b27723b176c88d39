"""ModulesToSaveWrapper: full trainable copies of whole modules (`modules_to_save`, e.g. a new `lm_head`).

As in PEFT, the original module stays as `original_module` and each adapter gets a deep copy under
`modules_to_save.<adapter>`; forward uses the active adapter's copy, or the original when none is active.
On disk the copy's tensors are saved under the original module's own keys (`lm_head.weight`).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disabled = False
        self.slot_table = None
        self.add(adapter_name)

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def remove(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def set_adapter(self, names: list[str]) -> None:
        held = [n for n in names if n in self.modules_to_save]
        if len(held) > 1:
            raise ValueError(f"modules_to_save wrapper can have only one active adapter, got {held}")
        self.active_adapter = held[0] if held else None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled:
            return self.original_module(x, *args, **kwargs)
        mapping = self.slot_table.mapping if self.slot_table is not None else None
        if mapping is not None:
            return self._mixed_forward(x, mapping, *args, **kwargs)
        if self.active_adapter is None:
            return self.original_module(x, *args, **kwargs)
        return self.modules_to_save[self.active_adapter](x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, mapping, *args, **kwargs):
        # Whole-module copies cannot be stacked; run each copy present on its rows (rare: heads only).
        result = self.original_module(x, *args, **kwargs)
        table = self.slot_table
        for name, module in self.modules_to_save.items():
            slot = table.slot_of.get(name)
            if slot is None:
                continue
            if mapping.layout == "rows":
                rows = (mapping.slots == slot).nonzero().flatten()
                if rows.numel():
                    result[rows] = module(x[rows], *args, **kwargs).to(result.dtype)
            else:
                # one row per token: features [..., in] -> [N, in]; an embedding's token ids [...] -> [N]
                flat_x = x.reshape(-1) if x.dim() < result.dim() else x.reshape(-1, x.shape[-1])
                tokens = (mapping.slots == slot).nonzero().flatten()
                if tokens.numel():
                    flat = result.view(-1, result.shape[-1])
                    flat[tokens] = module(flat_x[tokens], *args, **kwargs).to(result.dtype)
        return result
