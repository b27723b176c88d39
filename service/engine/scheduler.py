"""Continuous batching policy: which requests run in the next step, and with how many new tokens.

Every step first gives each decoding request its one token (decode latency never waits behind a long
prompt), then spends what is left of `max_batch_tokens` on prompt chunks of at most `prefill_chunk`
tokens: first requests already part-way through their prompt, then newly admitted ones (first come,
first served) while a KV-cache slot is free. A long prompt is therefore spread over several steps
while short requests keep decoding beside it.
"""

from __future__ import annotations

from collections import deque

from .kv_cache import KVCache
from .request import RequestState


class Scheduler:
    def __init__(self, max_batch_tokens: int, prefill_chunk: int):
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk

    def schedule(self, running: list[RequestState], waiting: deque, cache: KVCache) -> list[tuple[RequestState, int]]:
        """Pick (request, new tokens) for the next step; admits from `waiting` into `running` (slot allocated)."""
        plan: list[tuple[RequestState, int]] = []
        budget = self.max_batch_tokens
        for state in running:
            if not state.prefilling:
                plan.append((state, 1))
                budget -= 1
        for state in running:
            if state.prefilling and budget > 0:
                n = min(len(state.request.prompt_ids) - state.computed, self.prefill_chunk, budget)
                plan.append((state, n))
                budget -= n
        while waiting and budget > 0 and cache.free_slots:
            state = waiting.popleft()
            state.slot = cache.allocate()
            running.append(state)
            n = min(len(state.request.prompt_ids), self.prefill_chunk, budget)
            plan.append((state, n))
            budget -= n
        return plan
