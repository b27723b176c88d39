"""The KV cache: one preallocated key and value tensor for every layer and batch slot, sized once.

`k` and `v` are [layers, slots, kv_heads, max_seq_len, head_dim]; a running request owns one slot for its
whole life, and its tokens' keys and values sit at their positions. Nothing is allocated per step, so a
request that fits at admission can never run out of memory later. `spare_slots` more rows are allocated
that no request ever owns: a CUDA graph's padding rows write their keys and values there (cuda_graphs.py).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", spare_slots: int = 0):
        shape = (num_layers, num_slots + spare_slots, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.spare = num_slots if spare_slots else None         # the first spare row, owned by no request
        self.max_seq_len = max_seq_len
        self._free = list(range(num_slots - 1, -1, -1))

    @classmethod
    def for_model(cls, config, num_slots: int, max_seq_len: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu", spare_slots: int = 0) -> "KVCache":
        return cls(config.num_hidden_layers, num_slots, config.num_key_value_heads, max_seq_len, config.head_dim,
                   dtype, device, spare_slots)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV cache slot")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def clear(self, slot: int, length: int) -> None:
        """Zero the first `length` positions of `slot` (a failed request's keys and values may be NaN)."""
        self.k[:, slot, :, :length].zero_()
        self.v[:, slot, :, :length].zero_()

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
