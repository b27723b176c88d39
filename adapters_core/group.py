"""`grouped_forward`: layers that read the same input (q/k/v, gate/up) with their LoRA deltas in one kernel call.

In a mixed batch every adapted layer adds its per-token LoRA delta with one call of the fused CPU kernel
(`stack.stacked_forward`). A model whose layers come in groups reading one tensor can call
`grouped_forward([q_proj, k_proj, v_proj], x)` instead of the three layers: each base layer runs as usual,
and the group's deltas are added by one `lora_add_group_` call that converts each token's input once and
walks the tokens once for all members. On SmolLM2 this turns 210 kernel calls per step into 120 and skips
as many wrapper calls (the Python around each call costs more than its arithmetic at 16 tokens). Anything
the shortcut does not cover (hooks, IA3, DoRA, LoRA bias, gradients, no kernel, another device, layers
without adapters) falls back to calling each layer, so the result is always `[layer(x) for layer in layers]`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import sgmv
from .layer import AdapterLayer
from .batch_mapping import BatchMapping
from .batch_mapping import as_rows
from .stack import _lora_delta


def grouped_forward(layers: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, with the LoRA deltas of a mixed batch added in one fused call."""
    mapping = _shared_mapping(layers, x)
    rows_in = None if mapping is None else as_rows(x)
    if rows_in is None:
        return [layer(x) for layer in layers]
    mapping.check(x, "features")
    members = [i for i, layer in enumerate(layers) if layer.stack is not None]
    results = [layer.base_layer(x) for layer in layers]
    rows_out = [as_rows(results[i]) for i in members]
    if any(r is None for r in rows_out) or len({results[i].dtype for i in members}) > 1:
        for i in members:         # outputs the one-call kernel does not take: the torch path, member by member
            results[i] = _lora_delta(layers[i].stack, x, results[i], mapping)
        return results
    add_lora_deltas_([layers[i] for i in members], rows_in, rows_out, mapping)
    return results


def add_lora_deltas_(layers: Sequence[AdapterLayer], rows_in: torch.Tensor, rows_out: Sequence[torch.Tensor],
                     mapping: BatchMapping) -> None:
    """rows_out[k] [T, out_k] += each token's LoRA delta of layers[k] for rows_in [T, in], in one kernel call.
    The layers hold plain LoRA stacks (what `_shared_mapping` checks); rows have contiguous
    features (strided rows, such as column slices of a joined matmul's output, are fine). The mapping's
    per-token scales (a request's adapter_scale), if any, multiply each delta."""
    if layers:
        tokens = rows_in.shape[0]
        sgmv.lora_add_group_(list(rows_out), rows_in, [layer.stack.table for layer in layers],
                             mapping.token_slots(tokens), mapping.token_scales(tokens))


def _shared_mapping(layers: Sequence[nn.Module], x: torch.Tensor) -> Optional[BatchMapping]:
    """The mixed batch's mapping when the one-call path applies to every layer, else None."""
    if not x.is_cpu or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    table = None
    for layer in layers:
        if type(layer) is not AdapterLayer or layer.disabled or layer.merged_adapters or layer.is_embedding:
            return None
        if layer._forward_hooks or layer._forward_pre_hooks:
            return None
        if table is None:
            table = layer.slot_table
        if table is None or layer.slot_table is not table:
            return None
        st = layer.stack
        if st is not None:
            if not st.fused_lora or st.ia3_in is not None or st.ia3_out is not None:
                return None
    mapping = table.mapping
    if mapping is None or mapping.all_base or sgmv.kernel() is None:
        return None
    return mapping
