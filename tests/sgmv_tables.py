"""Slot tables for the fused kernel's direct tests: random LoRA factors of mixed ranks (and dtypes) per slot,
the int64 table `sgmv.lora_add_group_` reads, and the reference delta computed with plain torch ops."""
from __future__ import annotations

import torch

from adapters_core import sgmv


class Slots:
    """Slot s holds A [r_s, in], Bt [r_s, out] in dtypes[s] and a per-rank fp32 scale; rank 0: no adapter."""

    def __init__(self, fin: int, fout: int, ranks: list[int], dtypes: list[torch.dtype], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.factors = []
        self.table = torch.zeros(len(ranks), sgmv.TABLE_COLUMNS, dtype=torch.int64)
        for s, (r, dt) in enumerate(zip(ranks, dtypes)):
            if r == 0:
                self.factors.append(None)
                continue
            a = (torch.randn(r, fin, generator=g) * 0.3).to(dt)
            bt = (torch.randn(r, fout, generator=g) * 0.3).to(dt)
            scale = torch.rand(r, generator=g) + 0.5
            self.factors.append((a, bt, scale))
            self.table[s] = torch.tensor(sgmv.table_row(a, bt, scale))

    def delta(self, x: torch.Tensor, slots: torch.Tensor, scales=None) -> torch.Tensor:
        """Each row's delta in fp64: ((A x) * scale * token scale) @ Bt."""
        out = []
        for t, s in enumerate(slots.tolist()):
            f = self.factors[s]
            if f is None:
                out.append(torch.zeros(self.table[0, 6] if self.table[0, 6] else 0, dtype=torch.float64))
                continue
            a, bt, scale = (v.double() for v in f)
            h = (a @ x[t].double()) * scale * (1.0 if scales is None else float(scales[t]))
            out.append(h @ bt)
        width = max(v.numel() for v in out)
        return torch.stack([v if v.numel() else torch.zeros(width, dtype=torch.float64) for v in out])
