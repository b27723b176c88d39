"""`BatchMapping`: which adapter slot, and at what scale, each row or token of a mixed batch uses.

Built once per forward (`mixed_batch` for rows, `token_batch` for a flattened token batch) and read by every
adapted layer: the slots pick each row's adapter rows from the layer's stacks (`stack.py`), runs of equal
slots become the segments of the torch path, and `token_slots` is the fused kernel's form. An optional
per-row / per-token `scales` multiplies each LoRA delta (a request's `adapter_scale`); it is None when every
scale is 1, so batches that do not scale pay nothing: no tensor, no multiply, the same bits as before.
"""

from __future__ import annotations

from typing import Optional

import torch


class BatchMapping:
    """Which slot each row (`rows` layout, x is [B, ..., F]) or token (`tokens` layout, x flattens to
    [N, F]) of the next forward uses. Built once per forward; layers only gather with it."""

    def __init__(self, slots: torch.Tensor, layout: str, segment_len: Optional[int] = None,
                 scales: Optional[torch.Tensor] = None) -> None:
        self.layout = layout
        self.slots = slots                            # [B] or [N]
        # [B] or [N] fp32 multipliers of each row's / token's LoRA delta; None: all 1 (nothing to multiply)
        self.scales = None if scales is None else scales.to(device=slots.device, dtype=torch.float32).contiguous()
        if self.scales is not None and self.scales.shape != slots.shape:
            raise ValueError(f"{slots.numel()} slots but {self.scales.numel()} scales: one scale per row or token")
        self.seg_slots = slots                        # [G]
        self.gather: Optional[torch.Tensor] = None    # [G, L] token index per segment position
        self.scatter: Optional[torch.Tensor] = None   # [N] flat position of each token in [G * L]
        self.seg_len = 1
        # Every row/token on the base model (slot 0): layers skip the adapter work, which for identity
        # slots would add zeros at the full cost of gathering and multiplying them.
        self.all_base = not bool(slots.any())
        if layout == "tokens":
            self._build_segments(segment_len)
        # Identifies the gather pattern, so layers can reuse gathered adapter rows across steps.
        self.key = (self.layout, tuple(self.seg_slots.tolist()))
        self._token_slots: dict[int, torch.Tensor] = {}
        self._token_scales: dict[int, torch.Tensor] = {}
        self._seg_scales: Optional[torch.Tensor] = None

    @classmethod
    def rows(cls, slots: torch.Tensor, scales: Optional[torch.Tensor] = None) -> "BatchMapping":
        return cls(slots, "rows", scales=scales)

    @classmethod
    def tokens(cls, slots: torch.Tensor, segment_len: Optional[int] = None,
               scales: Optional[torch.Tensor] = None) -> "BatchMapping":
        return cls(slots, "tokens", segment_len, scales)

    @classmethod
    def token_buffer(cls, slots: torch.Tensor) -> "BatchMapping":
        """A tokens-layout mapping over a buffer whose values change after it is built (a CUDA graph's input,
        rewritten before each replay): one segment per token, nothing read from `slots` now, never all-base, no
        scales. Only kernels that read the slots as they run (the Triton SGMV's) may serve it."""
        mapping = cls(slots[:0], "tokens")
        mapping.slots = mapping.seg_slots = slots
        mapping.all_base, mapping.key = False, ("buffer", slots.data_ptr(), slots.numel())
        return mapping

    def to(self, device: torch.device) -> "BatchMapping":
        """This mapping with its tensors on `device` (itself when they are there). `token_batch` builds a
        mapping from host slots and then moves it: its segments come from `nonzero`, `tolist` and `any`, each
        of which waits for the GPU when the slots are on it (five waits a step, measured on an H200)."""
        device = torch.device(device)
        if self.slots.device == device:
            return self
        moved = {}

        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            if t is None:
                return None
            if id(t) not in moved:                       # seg_slots is often slots itself: one copy
                moved[id(t)] = t.to(device)
            return moved[id(t)]

        out = object.__new__(BatchMapping)
        out.__dict__.update(self.__dict__)
        out.slots, out.seg_slots, out.gather, out.scatter, out.scales = (
            move(self.slots), move(self.seg_slots), move(self.gather), move(self.scatter), move(self.scales))
        out._token_slots, out._token_scales, out._seg_scales = {}, {}, None
        return out

    def _build_segments(self, segment_len: Optional[int]) -> None:
        """Split runs of equal slots into segments of at most `L` tokens, L picked to keep padding low."""
        slots = self.slots
        n = slots.numel()
        if n == 0:
            return
        change = torch.ones(n, dtype=torch.bool, device=slots.device)
        change[1:] = slots[1:] != slots[:-1]
        starts = torch.nonzero(change).flatten()
        lengths = torch.diff(torch.cat([starts, torch.tensor([n], device=slots.device)]))
        if segment_len is None:
            segment_len = _best_segment_len(lengths)
        if int(lengths.max()) == 1 and segment_len == 1:
            self.seg_len = 1                              # one token per segment: x.unsqueeze(1) suffices
            return
        pieces = (lengths + segment_len - 1) // segment_len          # segments per run
        seg_run = torch.repeat_interleave(torch.arange(len(lengths), device=slots.device), pieces)
        first_piece = torch.cumsum(pieces, 0) - pieces
        piece_idx = torch.arange(int(pieces.sum()), device=slots.device) - first_piece[seg_run]
        seg_start = starts[seg_run] + piece_idx * segment_len                      # [G]
        seg_end = torch.minimum(starts[seg_run] + lengths[seg_run], seg_start + segment_len)
        offs = torch.arange(segment_len, device=slots.device)
        self.gather = torch.minimum(seg_start[:, None] + offs, seg_end[:, None] - 1)  # [G, L]
        self.seg_slots = slots[seg_start]
        self.seg_len = segment_len
        token_seg = torch.repeat_interleave(torch.arange(len(seg_start), device=slots.device),
                                            seg_end - seg_start)
        self.scatter = token_seg * segment_len + (torch.arange(n, device=slots.device) - seg_start[token_seg])

    # --- used by layers -----------------------------------------------------------------------------------
    def check(self, x: torch.Tensor, what: str) -> None:
        n = self.slots.numel()
        if self.layout == "rows" and (x.dim() < 2 and what != "ids" or x.shape[0] != n):
            raise ValueError(f"mixed batch of {n} rows, but a targeted layer got input of shape "
                             f"{tuple(x.shape)}; the batch dimension must come first")
        if self.layout == "tokens":
            tokens = x.numel() if what == "ids" else x.numel() // x.shape[-1]
            if tokens != n:
                raise ValueError(f"token batch of {n} tokens, but a targeted layer got input of shape "
                                 f"{tuple(x.shape)}")

    def token_slots(self, tokens: int) -> torch.Tensor:
        """The slot of every token of an input flattened to [tokens, F] (rows layout: each row's slot repeated
        for its tokens), contiguous: the fused kernel's form, made once per mapping and token count."""
        out = self._token_slots.get(tokens)
        if out is None:
            per_row = tokens // max(1, self.slots.numel())
            out = self.slots.repeat_interleave(per_row) if self.layout == "rows" and per_row > 1 else self.slots
            out = self._token_slots[tokens] = out.contiguous()
        return out

    def token_scales(self, tokens: int) -> Optional[torch.Tensor]:
        """The scale of every token of an input flattened to [tokens, F], fp32 and contiguous (the fused
        kernel's form), or None when there are no scales."""
        if self.scales is None:
            return None
        out = self._token_scales.get(tokens)
        if out is None:
            per_row = tokens // max(1, self.scales.numel())
            out = self.scales.repeat_interleave(per_row) if self.layout == "rows" and per_row > 1 else self.scales
            out = self._token_scales[tokens] = out.contiguous()
        return out

    def scales_like(self, like: torch.Tensor) -> torch.Tensor:
        """Scales broadcastable against `like` [..., F] in x's layout (only call with scales)."""
        if self.layout == "rows":
            return self.scales.view((-1,) + (1,) * (like.dim() - 1))
        return self.scales.view(like.shape[:-1] + (1,))

    def segment_scales(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Scales broadcastable against a segmented tensor `like` [G, L, R] (None without scales)."""
        if self.scales is None:
            return None
        if self._seg_scales is None or self._seg_scales.shape[:2] != like.shape[:2]:
            if self.layout == "rows":
                self._seg_scales = self.scales.view(-1, 1, 1)                      # [B, 1, 1]
            else:
                self._seg_scales = self.to_segments(self.scales.view(-1, 1))        # [G, L, 1]
        return self._seg_scales

    def tokens_per_segment(self, x: torch.Tensor) -> int:
        if self.layout == "rows":
            return x.numel() // max(1, x.shape[0] * x.shape[-1])
        return self.seg_len

    def per_token(self, table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table [n_slots, F] -> each row/token's entry, broadcastable against `like` [..., F]."""
        picked = table.index_select(0, self.slots)                   # [B, F] or [N, F]
        if self.layout == "rows":
            return picked.view((picked.shape[0],) + (1,) * (like.dim() - 2) + (picked.shape[-1],))
        return picked.view(like.shape[:-1] + (picked.shape[-1],))

    def to_segments(self, t: torch.Tensor) -> torch.Tensor:
        """[..., F] in x's layout -> [G, L, F]."""
        f = t.shape[-1]
        if self.layout == "rows":
            return t.reshape(t.shape[0], -1, f)
        flat = t.reshape(-1, f)
        if self.gather is None:
            return flat.unsqueeze(1)
        return flat[self.gather]

    def from_segments(self, d: torch.Tensor, like_shape: torch.Size) -> torch.Tensor:
        """[G, L, F] -> x's layout with feature size F."""
        f = d.shape[-1]
        if self.layout == "tokens" and self.scatter is not None:
            d = d.reshape(-1, f)[self.scatter]
        return d.reshape(tuple(like_shape[:-1]) + (f,))


def _best_segment_len(lengths: torch.Tensor) -> int:
    """Segment length minimising padded tokens plus a per-segment overhead worth ~8 tokens."""
    longest = int(lengths.max())
    best, best_cost = 1, None
    cand = 1
    while True:
        pieces = (lengths + cand - 1) // cand
        cost = int(pieces.sum()) * (cand + 8)
        if best_cost is None or cost < best_cost:
            best, best_cost = cand, cost
        if cand >= longest:
            break
        cand = min(cand * 2, longest)
    return best


def as_rows(t: torch.Tensor) -> Optional[torch.Tensor]:
    """t as [rows, features] without a copy and with contiguous features, or None (what the fused kernels take)."""
    if t.dim() != 2:
        try:
            t = t.view(-1, t.shape[-1])
        except RuntimeError:
            return None
    return t if t.stride(-1) == 1 else None
