"""Mixed batches: `mixed_batch(model, names)` (one adapter per row) and `token_batch` (one per token).

Both resolve names to slots once, bring the stacks of the adapters involved up to date, and install one
`BatchMapping` on the model for the duration of the `with` block; every AdapterLayer then runs the stacked
path of `stack.py`. `token_batch` is the engine's form: a flattened token batch (prefill chunks and decode
tokens of many requests side by side) with an adapter slot per token. Both take optional `scales`, one
multiplier per row / token of its LoRA delta (PEFT's `scaling` times the scale); all-ones scales are
dropped, so the batch computes exactly what it computes without them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .errors import UnknownAdapterError
from .batch_mapping import BatchMapping
from .layer import AdapterLayer
from .model_tree import slot_table
from .slot_table import BASE, SlotTable


def adapter_slot(model: nn.Module, adapter_name: str) -> int:
    """The global slot of an adapter (0 for `"__base__"`), for building token-slot tensors."""
    if adapter_name == BASE:
        return 0
    table = slot_table(model)
    if adapter_name not in table.slot_of:
        raise UnknownAdapterError(f"unknown adapter {adapter_name!r}; the model holds {sorted(table.slot_of)}")
    return table.slot_of[adapter_name]


def _device(model: nn.Module, table: SlotTable) -> torch.device:
    for module in table.modules:
        if isinstance(module, AdapterLayer):
            return module.base_layer.weight.device
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _check_usable(model: nn.Module, table: SlotTable, names: set[str]) -> None:
    if model.training:
        raise ValueError("mixed batches need the model in eval mode (call model.eval()); dropout is not supported")
    unknown = sorted(n for n in names if n != BASE and n not in table.slot_of)
    if unknown:
        raise UnknownAdapterError(f"unknown adapter(s) {unknown} in the batch; the model holds "
                                  f"{sorted(table.slot_of)}")
    if any(getattr(m, "merged_adapters", None) for m in table.modules):
        raise ValueError("mixed batches cannot run while adapters are merged; unmerge first")


@contextmanager
def _installed(table: SlotTable, mapping: BatchMapping) -> Iterator[BatchMapping]:
    previous, table.mapping = table.mapping, mapping
    try:
        yield mapping
    finally:
        table.mapping = previous


def _scales(scales, count: int, device: torch.device) -> Optional[torch.Tensor]:
    """`scales` as an fp32 tensor of `count` values, or None when absent or all 1 (nothing to multiply)."""
    if scales is None:
        return None
    t = torch.as_tensor(scales, dtype=torch.float32).to(device).flatten()
    if t.numel() != count:
        raise ValueError(f"{count} rows / tokens but {t.numel()} scales")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("adapter scales must be finite numbers")
    return None if bool((t == 1).all()) else t


def mixed_batch(model: nn.Module, adapter_names: Sequence[str], check_edits: bool = True,
                scales: Optional[Sequence[float]] = None):
    """Context manager: inside it, row i of the model's input runs with adapter `adapter_names[i]`, its
    LoRA delta multiplied by `scales[i]` when given (IA3 vectors are not scaled). `check_edits=False`: see
    `token_batch`."""
    table = slot_table(model)
    names = list(adapter_names)
    _check_usable(model, table, set(names))
    table.sync({n for n in names if n != BASE}, check_edits)
    slots = torch.tensor([adapter_slot(model, n) for n in names], dtype=torch.long)     # [B] on the host
    mapping = BatchMapping.rows(slots, _scales(scales, len(names), slots.device))
    return _installed(table, mapping.to(_device(model, table)))


def token_batch(model: nn.Module, token_adapters: Union[Sequence[str], torch.Tensor],
                segment_len: Optional[int] = None, sync: bool = True, check_edits: bool = True,
                scales: Union[Sequence[float], torch.Tensor, None] = None):
    """Context manager for a flattened batch: token t runs with `token_adapters[t]` (a name, or a slot
    from `adapter_slot`), its LoRA delta multiplied by `scales[t]` when given. Inputs of targeted layers
    must flatten to [num_tokens, features].
    `sync=False` skips the check that the adapters' stacked copies are current: only for a second batch
    over adapters that an earlier batch of the same step (e.g. the engine's forward) just checked.
    `check_edits=False` trusts that adapter weights change only through adapters_core's functions
    (`load_adapter`, `set_peft_model_state_dict`, `delete_adapter`, merging, `cast_adapter_dtype`) and
    skips the per-batch scan that catches in-place edits made any other way (e.g. an optimizer step)."""
    table = slot_table(model)
    device = _device(model, table)
    if isinstance(token_adapters, torch.Tensor):
        # slots on the host stay there while the segments are found (no wait for the GPU), then move at once
        slots = token_adapters.to(device=token_adapters.device if token_adapters.is_cpu else device,
                                  dtype=torch.long)
        used = {int(s) for s in torch.unique(slots).tolist()} - {0}
        # look-ups only (no iteration over the table's dicts): another thread may add an adapter meanwhile
        names = {table.name_of.get(s) for s in used}
        if None in names:
            raise UnknownAdapterError(f"unknown adapter slot(s) {sorted(s for s in used if s not in table.name_of)}")
    else:
        names = set(token_adapters)
        slots = torch.tensor([adapter_slot(model, n) for n in token_adapters], dtype=torch.long)
    _check_usable(model, table, names)
    if sync:
        table.sync(names - {BASE}, check_edits)
    mapping = BatchMapping.tokens(slots, segment_len, _scales(scales, slots.numel(), slots.device))
    return _installed(table, mapping.to(device))
