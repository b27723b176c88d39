"""`VirtualTokens`: the cache entries of prompt-learning adapters (prompt tuning, P-tuning, prefix tuning).

A request on such an adapter has the adapter's NVT virtual tokens in cache positions 0..NVT-1 of its slot and
its prompt from position NVT on, where PEFT puts them (`../shared/reference/prompt-learning.md`, recipes R2 and
R3). Prefix tuning's keys and values are the adapter's own tensors, written as they are (never rotated).
Prompt and P-tuning's virtual input embeddings are run through the base model once, at positions 0..NVT-1 on
the base adapter slot, and the keys and values that writes are kept: the numbers a prefill of [virtual;
prompt] puts there, since causal attention lets no later token change them. So a request's virtual tokens
cost one copy into its slot at admission and no forward work, and they are computed once per loaded adapter
(at its first request), never per request. Entries are keyed by the adapter's name in the model and checked
against its `PromptAdapter` object, so a replaced adapter is recomputed and a removed one dropped.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional

import torch

import adapters_core as ac
from service.model.decoder import StepPlan, StepSequence

from .kv_cache import KVCache

BASE_NAMES = (None, "__base__")


class VirtualTokens:
    def __init__(self, model, dtype: torch.dtype, device: torch.device,
                 adapters: Callable[[torch.Tensor], ContextManager]):
        self.model = model
        self.dtype, self.device = dtype, device
        self._adapters = adapters           # the engine's token -> adapter-slot mapping (all base here)
        self._entries: dict[str, tuple[ac.PromptAdapter, torch.Tensor, torch.Tensor]] = {}

    def count(self, adapter: Optional[str]) -> int:
        """How many virtual tokens `adapter` puts before the prompt (0: not a prompt-learning adapter)."""
        if adapter in BASE_NAMES:
            return 0
        found = self.model.__dict__.get("_prompt_adapters", {}).get(adapter)
        return 0 if found is None else found.num_virtual_tokens

    def write(self, cache: KVCache, slot: int, adapter: str) -> None:
        """Put `adapter`'s virtual tokens in positions 0..NVT-1 of cache slot `slot`, every layer."""
        keys, values = self.key_values(adapter)                      # [layers, Hkv, NVT, D] each
        n = keys.shape[2]
        cache.k[:, slot, :, :n] = keys
        cache.v[:, slot, :, :n] = values

    def key_values(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        found = ac.prompt_adapter(self.model, adapter)
        if len(self._entries) > len(self.model.__dict__.get("_prompt_adapters", {})):
            self._drop_stale()                       # removed adapters' entries go before they pile up
        entry = self._entries.get(adapter)
        if entry is None or entry[0] is not found:
            keys, values = found.key_values(self.dtype) if found.is_prefix else self._run(found)
            entry = (found, keys.to(self.device), values.to(self.device))
            self._entries[adapter] = entry
        return entry[1], entry[2]

    def _drop_stale(self) -> None:
        live = self.model.__dict__.get("_prompt_adapters", {})
        for name in [n for n, e in self._entries.items() if live.get(n) is not e[0]]:
            del self._entries[name]

    @torch.inference_mode()
    def _run(self, adapter: ac.PromptAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt / P-tuning: the base model's keys and values for the virtual embeddings alone."""
        n, config = adapter.num_virtual_tokens, self.model.config
        scratch = KVCache(config.num_hidden_layers, 1, config.num_key_value_heads, n, config.head_dim, self.dtype,
                          self.device)
        plan = StepPlan([StepSequence(0, 0, n)], torch.tensor([n - 1], dtype=torch.long, device=self.device))
        embeds = adapter.embeddings(self.dtype).to(self.device)                              # [NVT, hidden]
        tokens = torch.zeros(n, dtype=torch.long, device=self.device)                        # unused: embeds win
        positions = torch.arange(n, dtype=torch.long, device=self.device)                    # [NVT]
        with self._adapters(torch.zeros(n, dtype=torch.long, device=self.device)):
            self.model.forward_step(tokens, positions, plan, scratch, embeds=embeds)
        return scratch.k[:, 0], scratch.v[:, 0]                                              # [layers, Hkv, NVT, D]
