"""The step's direct path: every layer of a step as a straight run of kernel calls.

A decode step of the general path (`DecoderLayer.forward`) walks ~20 Python frames per layer: module calls,
the group's context manager, `grouped_forward`'s checks, each projection's wrapper, usability checks before
every kernel. Measured on SmolLM2 (stored Q4_1 weights, one sequence): 4.4 ms of an 11.3 ms step was not
matmul. Here the same kernels run in the same order on the same tensors (so the result is bit-identical),
with the checks done for the whole model at once (`direct_plan.DirectPlan`: walked once, kept while nothing
it read has changed, as `adapters_core.watched` counts): RMSNorm, the joined q/k/v matmul, the LoRA deltas
of q/k/v in one fused call, rotary, cache write and attention, o_proj, residual, RMSNorm, the joined
gate/up matmul and its deltas, SwiGLU, down_proj, residual.

It applies to steps on the CPU in fp32 (decode rows, and with the C++ loop also prompt chunks beside them: their
keys and values written into the cache, then the decode rows' attention, then each chunk's causal
`scaled_dot_product_attention`, as `Attention.forward_step` does; the layers' path for such a step takes the
GIL back from the server's other threads after each of its ~600 kernel calls) when every projection is a
stored-weight `QuantLinear` in its decoder group, either bare or wrapped by an `AdapterLayer` whose part
in this batch is nothing or plain LoRA (no IA3, DoRA, LoRA bias, hooks, merged adapters), and the kernels
are built. Such a step runs the whole loop in one C++ call (csrc/decode_layers.cpp, the same kernels in the
same order, the LoRA deltas through adapters_core's fused kernel: ~40 us of Python and bindings less per layer,
45.7 -> 43.3 ms for a 16-sequence step on 16 adapters); the loop below, in Python, is the same sequence for models
whose layers differ in shape. Anything else returns None and the general path runs, as it does everywhere with
`ADAPTER_SERVE_DIRECT_STEP=0` (or `direct_step.ENABLED = False`, which the tests use to compare both paths).
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch.nn.modules import module as _module

from adapters_core import sgmv
from adapters_core.group import add_lora_deltas_
from adapters_core.layer import AdapterLayer

from . import cpu_ops, quant_linear
from .direct_plan import DirectPlan, build_plan
from .quant_linear import QuantGroup

ENABLED = os.environ.get("ADAPTER_SERVE_DIRECT_STEP", "1") != "0"
# The C++ loop has the matmul pool's workers read the next weight ahead while it works between two matmuls
# (quant_matmul.cpp's quant_read_ahead); False leaves them idle there (the A/B of bench/quant_kernel_bench.py).
READ_AHEAD = True
# The C++ loop hands each matmul the LoRA factors that the fused call right after it reads, for the matmul's
# threads to pull into the cache as they compute (quant_matmul_alongside); False: the fused call reads them
# from memory itself (the A/B of bench/lora_alongside_bench.py).
FACTORS_ALONGSIDE = True
# The C++ loop has each matmul's threads compute the LoRA deltas of its input beside it (the workers take the
# deltas first, the calling thread the matmul; quant_matmul_beside), added as the matmul stores its outputs;
# False: the matmul first, then the fused call (with FACTORS_ALONGSIDE's prefetch).
LORA_BESIDE = True


def direct_decode(model, x: torch.Tensor, cos_sin, plan, cache) -> Optional[torch.Tensor]:
    """x [N, d] after every decoder layer, computed directly, or None when the step does not qualify."""
    if not ENABLED or not x.is_cpu or x.dtype != torch.float32 or (torch.is_grad_enabled() and x.requires_grad):
        return None
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    qm, ops = quant_linear.kernel(), cpu_ops.kernel()
    if qm is None or ops is None:
        return None
    layout = _plan(model)
    if layout is None or not layout.batch():
        return None
    works = layout.works
    mapping = layout.lora_mapping()
    cos, sin = cos_sin
    n = x.shape[0]
    if mapping is not None:
        mapping.check(x, "features")
    tables = _native_tables(model, layout)
    lora = _native_lora(works, mapping, n) if tables is not None else None
    if lora is None and plan.prefill:
        return None                      # prompt chunks: only the C++ loop takes them (the layers' path does)
    tokens, slots, last = _decode_rows(plan, x.device)
    if lora is not None:                 # the whole loop, LoRA deltas and prompt chunks included, in one C++ call
        chunks = [v for i in plan.prefill for v in (plan.sequences[i].slot, plan.sequences[i].start,
                                                    plan.sequences[i].length, plan.offsets[i])]
        gate = getattr(model, "step_gate", None)          # others may evict adapters meanwhile (step_gate.py)
        with gate.opened() if gate is not None else contextlib.nullcontext():
            ahead = qm.quant_read_ahead_entry() if READ_AHEAD and hasattr(qm, "quant_read_ahead_entry") else 0
            beside = _beside_entries(qm) if LORA_BESIDE and lora[0] else (0, 0)
            return ops.decode_layers(x, qm.quant_matmul_entry(), ahead, FACTORS_ALONGSIDE, *tables, cos, sin,
                                     cache.k, cache.v, tokens, slots, last, model.config.head_dim ** -0.5, *lora,
                                     chunks, *beside)
    for w in works:
        layer = w.layer
        attn = layer.self_attn
        norm = layer.input_layernorm
        h = ops.rms_norm(x, norm.weight, norm.eps)                                         # [N, d]
        st = w.qkv.stored
        qkv = qm.quant_matmul(h, st.data, st.kernel_id, st.row_scale, w.qkv.bias)          # [N, q + 2 kv]
        q, k, v = qkv.split(w.qkv.sizes, 1)
        if w.qkv_loras:
            add_lora_deltas_(w.qkv_loras, h, [(q, k, v)[_member(w.qkv, m)] for m in w.qkv_loras], mapping)
        q, k = ops.rotary(q.view(n, attn.num_heads, attn.head_dim), k.view(n, attn.num_kv_heads, attn.head_dim),
                          cos, sin)                                                        # [N, H(kv), D]
        out = torch.empty_like(q)                                                          # [N, H, D]
        ops.decode_attention_(out, q, k, v.view(n, attn.num_kv_heads, attn.head_dim), cache.k[attn.layer_index],
                              cache.v[attn.layer_index], tokens, slots, last, attn.head_dim ** -0.5)
        out = out.view(n, -1)
        st = w.o.stored
        o = qm.quant_matmul(out, st.data, st.kernel_id, st.row_scale, w.o.bias)            # [N, d]
        if w.o_loras:
            add_lora_deltas_(w.o_loras, out, [o], mapping)
        x = x + o
        norm = layer.post_attention_layernorm
        h = ops.rms_norm(x, norm.weight, norm.eps)
        st = w.gate_up.stored
        gate_up = qm.quant_matmul(h, st.data, st.kernel_id, st.row_scale, w.gate_up.bias)  # [N, 2 I]
        gate, up = gate_up.split(w.gate_up.sizes, 1)
        if w.gate_up_loras:
            add_lora_deltas_(w.gate_up_loras, h, [(gate, up)[_member(w.gate_up, m)] for m in w.gate_up_loras],
                             mapping)
        hidden = ops.silu_mul(gate, up)                                                    # [N, I]
        st = w.down.stored
        down = qm.quant_matmul(hidden, st.data, st.kernel_id, st.row_scale, w.down.bias)   # [N, d]
        if w.down_loras:
            add_lora_deltas_(w.down_loras, hidden, [down], mapping)
        x = x + down
    return x


def _decode_rows(plan, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row indices, cache slots, positions) of the step's one-token sequences (empty when it has none)."""
    if not plan.decode:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty, empty
    tokens, slots, last, _ = plan.decode_tensors(device)
    return tokens, slots, last


def _plan(model) -> Optional[DirectPlan]:
    """The model's `DirectPlan`, kept on the model while it holds, else walked again (None: a layer the
    direct path does not compute)."""
    layers = model.model.layers._modules
    plan = getattr(model, "_direct_plan", None)
    if plan is not None and plan.holds(list(layers.values())):
        return plan
    plan = model._direct_plan = build_plan(model, _decoder_kinds())
    return plan


def _decoder_kinds() -> tuple:
    """(Attention, MLP, RMSNorm) of decoder.py, which imports this module."""
    from .decoder import MLP, Attention, RMSNorm
    return Attention, MLP, RMSNorm


def _member(group: QuantGroup, module: AdapterLayer) -> int:
    return group.members.index(module.base_layer)


def _native_lora(works, mapping, tokens: int) -> Optional[tuple]:
    """decode_layers' LoRA arguments (lora_add_group_'s address, 7 slot tables or None per layer in the order
    q, k, v, o, gate, up, down, the tokens' slots and scales): no deltas when `mapping` is None; None when
    the fused kernel is not built."""
    if mapping is None:
        return 0, [], None, None
    kernel = sgmv.kernel()
    if kernel is None or not hasattr(kernel, "lora_add_group_entry"):
        return None
    tables = []
    for w in works:
        layer = [None] * 7
        for m in w.qkv_loras:
            layer[_member(w.qkv, m)] = m.stack.table
        for m in w.o_loras:
            layer[3] = m.stack.table
        for m in w.gate_up_loras:
            layer[4 + _member(w.gate_up, m)] = m.stack.table
        for m in w.down_loras:
            layer[6] = m.stack.table
        tables += layer
    return kernel.lora_add_group_entry(), tables, mapping.token_slots(tokens), mapping.token_scales(tokens)


def _beside_entries(qm) -> tuple[int, int]:
    """(quant_matmul_beside's address, lora_add_group_split_'s) for decode_layers, or (0, 0) where a build
    lacks either (the deltas then follow each matmul)."""
    kernel = sgmv.kernel()
    if not hasattr(qm, "quant_matmul_beside_entry") or not hasattr(kernel, "lora_add_group_split_entry"):
        return 0, 0
    return qm.quant_matmul_beside_entry(), kernel.lora_add_group_split_entry()


def _native_tables(model, layout: DirectPlan) -> Optional[tuple]:
    """`_build_native_tables`, kept with the plan while it holds (`DirectPlan.holds` compares every tensor
    the tables hold, the parameters and stored weights included): rebuilding them took ~0.3 ms of Python a
    step on SmolLM2's 30 layers. (The plain numbers the build checks, heads and norm epsilons, are set once
    per module.)"""
    if not layout.tables_built:
        layout.tables, layout.tables_built = _build_native_tables(model, layout.works), True
    return layout.tables


def _build_native_tables(model, works) -> Optional[tuple]:
    """decode_layers' arguments (layer tensors, kernel formats, shape, eps) for a model whose layers all have
    one shape and one norm epsilon, each attention reading its own cache layer; else None."""
    c = model.config
    head_dim, heads, kv_heads = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    inter, eps = works[0].gate_up.sizes[0], works[0].layer.input_layernorm.eps
    tensors, formats = [], []
    for index, w in enumerate(works):
        layer = w.layer
        attn, norms = layer.self_attn, (layer.input_layernorm, layer.post_attention_layernorm)
        if (attn.layer_index != index or attn.num_heads != heads or attn.num_kv_heads != kv_heads
                or attn.head_dim != head_dim or w.qkv.sizes != [heads * head_dim] + [kv_heads * head_dim] * 2
                or w.gate_up.sizes != [inter, inter] or any(norm.eps != eps for norm in norms)):
            return None
        tensors += [norms[0].weight, norms[1].weight]
        for stored, bias in ((w.qkv.stored, w.qkv.bias), (w.o.stored, w.o.bias), (w.gate_up.stored, w.gate_up.bias),
                             (w.down.stored, w.down.bias)):
            tensors += [stored.data, stored.row_scale, bias]
            formats.append(stored.kernel_id)
    return tensors, formats, [heads, kv_heads, head_dim, inter], eps
