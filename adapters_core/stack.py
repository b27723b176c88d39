"""Per-slot adapter weights and the mixed-batch forward: the hot path.

PEFT runs a mixed batch by looping in Python over the adapters present and indexing sub-batches in every
layer. Here every adapter of a model owns one global *slot* (slot 0 is the base model); each AdapterLayer
keeps a `LayerStack` indexed by slot, and one `BatchMapping` (`batch_mapping.py`) built once per forward
says which slot each row (or token) uses, and optionally a scale for its LoRA delta (applied to the shrink's
output). A layer then does the same few batched ops whatever the mix: on the CPU with plain LoRA deltas, one
call of the fused kernel (`sgmv.py`: each token's factors read in place through the layer's slot table, the
shrink and expand of Punica's SGMV in one pass); on CUDA Triton's SGMV kernels on padded stacks kept for
them (`cuda_lora.py`, `triton_sgmv.py`, `LayerStack.padded`); otherwise the segments' factors gathered into
padded copies, two `bmm`s, and per-token gathers for IA3 scales, DoRA factors and LoRA biases. Identity slots (no
factors for LoRA, ones for IA3) make base rows and adapters absent from a layer cost nothing special.

LoRA factors are not copied into the stack: it holds the adapter's own A [r, in] and B's storage laid out
as Bt [r, out] (lora_B's weight becomes a transposed view of it), in their own dtype and rank, so an adapter
takes its weight bytes once whatever its rank next to others (S-LoRA's unified memory: no padding to the
largest rank, no second copy); the per-rank scaling (LoRA's alpha/r, AdaLoRA's E·alpha/ranknum) is an fp32
vector applied to the shrink's output. On the CPU, decode-shaped torch-path work on half-precision factors
is computed in fp32 (faster there, and more exact).
Stacks are refreshed lazily and incrementally: `SlotTable.sync` (slot_table.py) rewrites an adapter's slot only
when its tensors changed since the last write (tracked by tensor identity and torch's in-place `_version`
counters), so loading the 51st adapter costs the same as the first and in-place edits are never missed.
A caller that changes adapters only through adapters_core's functions (a server's registry) can skip that
scan (`check_edits=False`): those functions invalidate the adapters they change. An adapter attached by
`prepared.attach_prepared` brings its slot rows computed off the serving thread (`lora_slot_rows`), so its
first write is a few dict and table writes per layer instead of re-deriving them (3.3 -> 0.4 ms a SmolLM2
adapter on q/v, paid inside the first step that uses it).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import cuda_lora, sgmv
from .batch_mapping import BatchMapping, as_rows

def _grow(t: Optional[torch.Tensor], shape: tuple, fill: float, dtype, device) -> torch.Tensor:
    """A tensor of `shape` filled with `fill`, holding `t` in its leading corner."""
    out = torch.full(shape, fill, dtype=dtype, device=device)
    if t is not None:
        out[tuple(slice(0, s) for s in t.shape)] = t.to(dtype)
    return out


class LayerStack:
    """One layer's adapters by slot: LoRA factors in place (through a table), IA3 vectors, DoRA factors."""

    def __init__(self, layer) -> None:
        self.layer = layer
        self.slot_names: dict[int, str] = {}
        self._name_slots: dict[str, set[int]] = {}    # slot_names inverted: `forget` must not walk every slot
        self.n = 0                                      # slots allocated in the table and the vectors
        self.version = 0                                # bumped on every change of what the stack holds
        self._gathered: tuple = (None, -1, None)        # (mapping key, version, gathered tensors)
        self._padded: tuple = (-1, None)                # (version, padded stacks) for `padded()`
        self.dtype: Optional[torch.dtype] = None        # the per-slot vectors' dtype
        self.device = layer.base_layer.weight.device
        # slot -> (A [r, in], Bt [r, out], per-rank fp32 scale [r]): the adapter's own tensors, no copies, no
        # padding (Bt is the storage of lora_B's weight, which becomes its transposed view at the first write)
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.table: Optional[torch.Tensor] = None       # [n, 7] int64: what the fused kernel reads (sgmv.py)
        self.off_table: set[int] = set()                # slots whose factors the kernel cannot read (dtype)
        self.bias: Optional[torch.Tensor] = None       # [n, out]: lora_B.bias * scaling
        self.dora: Optional[torch.Tensor] = None       # [n, out]: m / ||W + sBA||, 1 for other slots
        self.ia3_in: Optional[torch.Tensor] = None     # [n, in]
        self.ia3_out: Optional[torch.Tensor] = None    # [n, out]

    @property
    def rank(self) -> int:
        """The largest LoRA rank held (0 without LoRA)."""
        return max((a.shape[0] for a, _, _ in self.lora.values()), default=0)

    @property
    def lora_dtype(self) -> Optional[torch.dtype]:
        dtypes = {a.dtype for a, _, _ in self.lora.values()}
        if not dtypes:
            return None
        out = dtypes.pop()
        for d in dtypes:
            out = torch.promote_types(out, d)
        return out

    @property
    def plain_lora(self) -> bool:
        """LoRA deltas a fused kernel adds by itself: LoRA factors held, no LoRA bias, no DoRA factors."""
        return bool(self.lora) and self.bias is None and self.dora is None

    @property
    def fused_lora(self) -> bool:
        """Plain LoRA deltas whose every factor the CPU kernel reads through the table."""
        return self.plain_lora and not self.off_table

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A [n, in, R] (per-rank scale folded in) and B [n, R, out]: every slot's factors zero-padded to the
        largest rank, in the factors' promoted dtype, for kernels that index stacks by slot (Triton's, on
        CUDA). A copy of every adapter, rebuilt after each change: the CPU paths never ask for it."""
        key, held = self._padded
        if key == self.version:
            return held
        lay, dtype, rank = self.layer, self.lora_dtype, self.rank
        a = torch.zeros(self.n, lay.in_features, rank, dtype=dtype, device=self.device)   # [n, in, R]
        b = torch.zeros(self.n, rank, lay.out_features, dtype=dtype, device=self.device)  # [n, R, out]
        for slot, (fa, fbt, scale) in self.lora.items():
            r = fa.shape[0]
            a[slot, :, :r] = (fa.float() * scale[:, None]).T.to(dtype)
            b[slot, :r] = fbt
        self._padded = (self.version, (a, b))
        return a, b

    def reserve(self, slot: int) -> None:
        self._reserve(slot, self.dtype)

    def _reserve(self, slot: int, dtype: Optional[torch.dtype]) -> None:
        """Grow the slot count (doubling: the table and vectors are small) or the vectors' dtype so `slot` fits."""
        n = max(self.n, 1)
        while n <= slot:
            n *= 2
        new_dtype = dtype if self.dtype is None or dtype is None else torch.promote_types(self.dtype, dtype)
        if n == self.n and new_dtype == self.dtype:
            return
        self.version += 1
        if n != self.n:
            self.table = _grow(self.table, (n, sgmv.TABLE_COLUMNS), 0, torch.int64, torch.device("cpu"))
        self.n, self.dtype = n, new_dtype
        lay, dev = self.layer, self.device
        for attr, width, fill in (("bias", lay.out_features, 0.0), ("dora", lay.out_features, 1.0),
                                  ("ia3_in", lay.in_features, 1.0), ("ia3_out", lay.out_features, 1.0)):
            t = getattr(self, attr)
            if t is not None:
                setattr(self, attr, _grow(t, (n, width), fill, new_dtype, dev))

    def _ensure(self, attr: str, width: int, fill: float) -> torch.Tensor:
        if getattr(self, attr) is None:
            setattr(self, attr, torch.full((self.n, width), fill, dtype=self.dtype, device=self.device))
        return getattr(self, attr)

    def clear(self, slot: int) -> None:
        self.version += 1
        self._gathered = (None, -1, None)
        self.lora.pop(slot, None)
        self.off_table.discard(slot)
        if slot >= self.n:
            return
        self._set_row(slot, 0)
        for attr, fill in (("bias", 0.0), ("dora", 1.0), ("ia3_in", 1.0), ("ia3_out", 1.0)):
            t = getattr(self, attr)
            if t is not None:
                t[slot] = fill

    def forget(self, name: str) -> None:
        for slot in sorted(self._name_slots.pop(name, ())):
            self.clear(slot)
            del self.slot_names[slot]

    def compute_dtype(self, tokens_per_segment: int) -> torch.dtype:
        """fp32 for decode-shaped work on the CPU when the factors are half precision: CPU kernels for small
        batched half-precision matmuls are slower than fp32 ones (measured 2x for bf16 `bmm` at rank 16
        and one token per row), while for long segments the half-precision kernels win."""
        dtype = self.lora_dtype
        if self.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and tokens_per_segment <= 4:
            return torch.float32
        return dtype

    def gathered(self, mapping: "BatchMapping", dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
        """The mapping's segments' A^T [G, in, R], Bt [G, R, out] and per-rank scales [G, 1, R], zero-padded
        to the largest rank among them, in `dtype` (the scales in fp32): the torch path's operands. Kept while
        the mapping's slots and the stack stay the same, so consecutive decode steps skip the copies."""
        key, version, held = self._gathered
        if key == (mapping.key, dtype) and version == self.version:
            return held
        slots = mapping.seg_slots.tolist()
        rank = max((self.lora[s][0].shape[0] for s in slots if s in self.lora), default=0)
        lay, g = self.layer, len(slots)
        a = torch.zeros(g, lay.in_features, rank, dtype=dtype, device=self.device)       # [G, in, R]
        b = torch.zeros(g, rank, lay.out_features, dtype=dtype, device=self.device)      # [G, R, out]
        scale = torch.zeros(g, 1, rank, dtype=torch.float32, device=self.device)         # [G, 1, R]
        for i, s in enumerate(slots):
            if s in self.lora:
                fa, fbt, fs = self.lora[s]
                r = fa.shape[0]
                a[i, :, :r] = fa.T
                b[i, :r] = fbt
                scale[i, 0, :r] = fs
        held = (a, b, scale)
        self._gathered = ((mapping.key, dtype), self.version, held)
        return held

    @torch.no_grad()
    def write(self, slot: int, name: str, ready: Optional[tuple] = None) -> None:
        """Hold adapter `name`'s tensors in `slot`. `ready`: its `lora_slot_rows` for this layer, computed
        when it was prepared (a plain LoRA: no bias, no DoRA), written as they are."""
        self.version += 1
        lay = self.layer
        if ready is not None:
            self._hold_factors(slot, *ready)
            self._name_slot(slot, name)
            return
        kind = lay.kind[name]
        if kind == "IA3":
            vec = lay.ia3_l[name]
            self._reserve(max(slot, lay.slot_table.num_slots - 1), vec.dtype)
            self.clear(slot)
            target = "ia3_in" if lay.ia3_feedforward[name] else "ia3_out"
            width = lay.in_features if lay.ia3_feedforward[name] else lay.out_features
            self._ensure(target, width, 1.0)[slot] = vec.detach().flatten().to(self.dtype)
        else:
            a, b, scale = _lora_rows(lay, name)
            self._hold_factors(slot, a, b, scale, sgmv.table_row(a, b, scale))
            if kind == "LORA" and not lay.is_embedding and lay.lora_B[name].bias is not None:
                self._ensure("bias", lay.out_features, 0.0)[slot] = (
                    lay.lora_B[name].bias.detach() * lay.scaling[name]).to(self.dtype)
            if name in lay.lora_magnitude_vector:
                self._ensure("dora", lay.out_features, 1.0)[slot] = lay.dora_scale(name, self.dtype).detach()
        self._name_slot(slot, name)

    def _hold_factors(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                      row: Optional[list[int]]) -> None:
        """`slot` cleared, then holding A [r, in], Bt [r, out] and the fp32 scale [r] in place, with the
        kernel's table row (None: the slot takes the torch path)."""
        self._reserve(max(slot, self.layer.slot_table.num_slots - 1), a.dtype)
        self.clear(slot)
        self.lora[slot] = (a, b, scale)
        if row is None:
            self.off_table.add(slot)
        else:
            self._set_row(slot, row)

    def _set_row(self, slot: int, row) -> None:
        """Write one row of the table through a numpy view of it, which holds the GIL: a torch `table[slot] =`
        hands the GIL to the server's other threads and waits to get it back (up to the 5 ms switch interval,
        per layer, when an adapter is written or evicted between two steps). The view is taken each time, so a
        copied stack never writes into its original's table."""
        self.table.numpy()[slot] = row

    def _name_slot(self, slot: int, name: str) -> None:
        held = self.slot_names.get(slot)
        if held is not None and held != name:
            self._name_slots[held].discard(slot)
        self.slot_names[slot] = name
        self._name_slots.setdefault(name, set()).add(slot)


def _lora_rows(lay, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, in], Bt [r, out], per-rank fp32 scale [r]) of a LoRA / AdaLoRA adapter, both factors contiguous
    and sharing the parameters' storage: a B weight [out, r] whose storage is not already transposed (a loader
    can prepare it so, `transposed_b`) is copied once, and the parameter becomes a view of the copy, so the
    adapter is held once whatever the path."""
    a, b, _ = lay.lora_factors(name)
    a, b = _held_rows(a, b)
    if lay.kind[name] == "ADALORA":
        scale = lay.adalora_E[name].detach().reshape(-1).float() * (lay.scaling[name] / (lay.ranknum[name] + 1e-5))
    else:
        scale = lora_scale_rows(a.shape[0], lay.scaling[name], a.device)
    return a, b, scale.contiguous()


_SCALE_ROWS: dict[tuple, torch.Tensor] = {}
_MAX_SCALE_ROWS = 4096


def lora_scale_rows(rank: int, scaling: float, device) -> torch.Tensor:
    """The fp32 per-rank scale [rank] of a plain LoRA whose delta scale is `scaling`, as the stacks hold it:
    one tensor per (rank, scaling, device) for the process, shared read-only by every layer and adapter that
    has them (nothing writes a slot's scale rows; the stacks' gathers copy them). Made once, outside inference
    mode (a step's first use may run inside it; a later forward that records autograd may save them): `torch.full`
    lets the GIL go, and a loader that made them for each adapter beside a busy event loop waited up to the 5 ms
    switch interval to get it back, in about one load of three (tests/core/test_prepared.py)."""
    key = (rank, scaling, device)
    rows = _SCALE_ROWS.get(key)
    if rows is None:
        if len(_SCALE_ROWS) >= _MAX_SCALE_ROWS:     # (many ranks x alphas: start again rather than grow)
            _SCALE_ROWS.clear()
        with torch.inference_mode(False):
            rows = _SCALE_ROWS[key] = torch.full((rank,), scaling, dtype=torch.float32, device=device)
    return rows


def _held_rows(a_param: torch.Tensor, b_param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], Bt [r, out]) contiguous and sharing the parameters' storage (see `_lora_rows`)."""
    out = []
    for which, tensor in (("A", a_param), ("B", b_param)):
        rows = tensor.detach() if which == "A" else tensor.detach().T            # [r, in] / [r, out]
        if not rows.is_contiguous():
            rows = rows.contiguous()
            tensor.data = rows if which == "A" else rows.T
        out.append(rows)
    return out[0], out[1]


def plain_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A LoRA's factors before they become parameters, as the stacks hold them: (A [r, in] contiguous, B
    [out, r] whose storage is laid out as Bt, that Bt [r, out]), without autograd history, sharing storage
    with what was given where it already is so (a packed or mapped adapter's: then two tensor calls a layer,
    where detaching the parameters made of them again took four, each handing a loader's GIL to the server)."""
    if a.requires_grad or type(a) is not torch.Tensor:         # (a Parameter: its plain tensor)
        a = a.detach()
    if b.requires_grad or type(b) is not torch.Tensor:
        b = b.detach()
    if not a.is_contiguous():
        a = a.contiguous()
    bt = b.T                                                                        # [r, out]
    if not bt.is_contiguous():
        bt = bt.contiguous()
        b = bt.T
    return a, b, bt


def lora_slot_rows(a: torch.Tensor, bt: torch.Tensor, scaling: float, scale: Optional[torch.Tensor] = None,
                   checked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[list[int]]]:
    """What `LayerStack.write` holds for a plain LoRA with factors A [r, in] and Bt [r, out] as `plain_factors`
    gives them (the lora_A / lora_B parameters share their storage) and delta scale `scaling`: (A, Bt, fp32
    scale [r], the kernel's table row, or None where the kernel cannot read the factors). For an adapter not
    yet in the model (`prepared.prepare_adapter`, off the serving thread). `scale`: the fp32 [r] rows of
    `scaling` on A's device when the caller has them (layers of one rank and scaling may share them: nothing
    writes them), else they are made here. `checked`: A and Bt are `plain_factors`' of one dtype on the CPU and
    the scale `lora_scale_rows`' (`sgmv.table_row`'s checks are skipped)."""
    if scale is None:
        scale = lora_scale_rows(a.shape[0], scaling, a.device)
    return a, bt, scale, sgmv.table_row(a, bt, scale, checked)


def transposed_b(b: torch.Tensor) -> torch.Tensor:
    """B [out, r] with its storage laid out as B^T [r, out] (same values): what the stacks read in place, so
    a loader that prepares it so off the serving thread spares the first mixed batch a copy."""
    return b.T.contiguous().T


def stacked_forward(layer, x: torch.Tensor, mapping: BatchMapping, *args, **kwargs) -> torch.Tensor:
    """A layer's forward for a mixed batch: every row/token with its own slot, in a fixed number of ops.
    This runs for every adapted layer of every engine step (210 calls per SmolLM2 step), so it reads few
    attributes: measured per call on a decode step, 7 us of Python around the kernel (was 12 us)."""
    st = layer.stack
    base_layer = layer.base_layer
    if st is None or mapping.all_base:           # no adapter of this batch touches the layer, or none applies
        return base_layer(x, *args, **kwargs)
    if layer.is_embedding:
        return _stacked_embedding(layer, st, x, mapping, *args, **kwargs)
    mapping.check(x, "features")
    x_base = x
    if st.ia3_in is not None:
        x_base = (x.to(st.dtype) * mapping.per_token(st.ia3_in, x)).to(x.dtype)
    result = base_layer(x_base, *args, **kwargs)
    if st.ia3_out is not None:
        result = (result.to(st.dtype) * mapping.per_token(st.ia3_out, result)).to(result.dtype)
    if not st.lora:
        return result
    if st.fused_lora and x.is_cpu:
        rows_in = _fused_rows(x)
        rows_out = None if rows_in is None else as_rows(result)
        if rows_out is not None and not (torch.is_grad_enabled() and (x.requires_grad or result.requires_grad)):
            tokens = rows_in.shape[0]
            sgmv.lora_add_group_([rows_out], rows_in, [st.table], mapping.token_slots(tokens),   # result += LoRA
                                 mapping.token_scales(tokens))
            return result
    if st.plain_lora and cuda_lora.add_(st, x, result, mapping):       # on CUDA: the Triton SGMV kernels
        return result
    return _lora_delta(st, x, result, mapping)


def _lora_delta(st: LayerStack, x: torch.Tensor, result: torch.Tensor, mapping: BatchMapping) -> torch.Tensor:
    """result + each row/token's LoRA delta (bias and DoRA included) with torch ops: gathered rows, two `bmm`s."""
    result_dtype = result.dtype
    dtype = st.compute_dtype(mapping.tokens_per_segment(x))
    xs = mapping.to_segments(x.to(dtype))                                     # [G, L, in]
    a, b, rank_scale = st.gathered(mapping, dtype)
    h = torch.bmm(xs, a)                                                      # [G, L, R]
    h.mul_(rank_scale if h.dtype == torch.float32 else rank_scale.to(h.dtype))  # [G, L, R]: alpha / r and such
    if mapping.scales is not None:
        h.mul_(mapping.segment_scales(h))                                     # [G, L, R]: each token's scale
    in_place = st.bias is None and st.dora is None and (mapping.layout == "rows" or mapping.scatter is None)
    if in_place and result.dtype == dtype:
        # In place into the base output: no [B, S, out] temporary (the base output is ours to change).
        result.view(xs.shape[0], -1, result.shape[-1]).baddbmm_(h, b)
        return result
    d = torch.bmm(h, b)                                                       # [G, L, out]
    if in_place:                                  # add_ casts fp32 adapter output into the bf16 base output
        result.view(d.shape[0], -1, result.shape[-1]).add_(d)
        return result
    delta = mapping.from_segments(d, result.shape)                            # like result
    if st.bias is not None:
        bias = mapping.per_token(st.bias, delta)                              # like delta
        if mapping.scales is not None:                                        # lora_B's bias is in the delta
            bias = bias * mapping.scales_like(delta)
        delta = delta + bias
    if st.dora is not None:
        g = mapping.per_token(st.dora, delta)
        bias = getattr(st.layer.base_layer, "bias", None)
        base = result if bias is None else result - bias
        return (result + (g - 1) * base + g * delta).to(result_dtype)
    return result + delta.to(result_dtype)


def _fused_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """x as [tokens, in] for the fused kernel when it is built, else None. The caller has checked: CPU, LoRA
    deltas without bias or DoRA. The kernel reads each token's adapter rows itself, so it serves any batch
    shape: measured on the development CPU with SmolLM2 and rank-16 adapters, it beats gathered rows and
    bf16 `bmm`s for prefill too (16 prompts of ~10 tokens: 155 vs 184 ms per step; one 512-token prompt:
    519 vs 579 ms), because the adapters' rows stay in cache across a segment's tokens."""
    if sgmv.kernel() is None:
        return None
    return as_rows(x)


def _stacked_embedding(layer, st: LayerStack, ids: torch.Tensor, mapping: BatchMapping, *args, **kwargs):
    mapping.check(ids, "ids")
    result = layer.base_layer(ids, *args, **kwargs)
    if not st.lora or mapping.all_base:
        return result
    per_id = (-1,) + (1,) * (ids.dim() - 1) if mapping.layout == "rows" else ids.shape
    tok_slots = mapping.slots.view(per_id).expand_as(ids)
    dtype = st.lora_dtype
    _, b, _ = st.gathered(mapping, dtype)                                      # [G, R, d]
    if b.shape[1] == 0:
        return result                  # none of the batch's adapters has a LoRA on this embedding
    h = torch.zeros(ids.shape + (b.shape[1],), dtype=dtype, device=result.device)  # [..., R]
    for slot in mapping.seg_slots.unique().tolist():                          # each adapter's rows of its ids
        if slot in st.lora:
            a, _, scale = st.lora[slot]                                        # A [r, V], scale [r]
            take = tok_slots == slot
            h[take, :a.shape[0]] = (a[:, ids[take]].T.float() * scale).to(dtype)
    if mapping.scales is not None:
        h.mul_(mapping.scales.view(per_id).unsqueeze(-1))                      # [..., R]: each token's scale
    d = torch.bmm(mapping.to_segments(h), b)                                   # [G, L, d]
    delta = mapping.from_segments(d, result.shape)
    if st.dora is not None:
        g = mapping.per_token(st.dora, delta)
        return (result * g + g * delta).to(result.dtype)
    scale = layer.embed_scale()
    if scale is not None:
        delta = delta * scale.to(delta.dtype)
    return result + delta.to(result.dtype)
