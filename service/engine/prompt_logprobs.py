"""Prompt tokens' log-probabilities (TGI's `decoder_input_details`, OpenAI's `echo` with `logprobs`, vLLM's
`prompt_logprobs`), computed only for the requests that ask.

The engine samples from one hidden row per request (its last known token); a request that asks for prompt
log-probabilities also gets, in every step that computes a chunk of its prompt, the rows of that chunk's
tokens whose next token is still in the prompt. Those rows go through the final norm and the head beside
the sampled ones (the same adapter and scale), and each gives the log-probability of the prompt token that
follows it under the model's raw distribution (log-softmax of the logits, as the sampled tokens' reported
log-probabilities) and, when asked, the k likeliest tokens there. The first prompt token has no
log-probability (None), as in TGI and OpenAI. Requests that do not ask add no row and no work.
"""

from __future__ import annotations

from typing import Optional

import torch

MAX_PROMPT_LOGPROBS = 20          # alternatives per prompt token (TGI's top_n_tokens bound)


def check_prompt_logprobs(k: Optional[int]) -> None:
    if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_PROMPT_LOGPROBS):
        raise ValueError(f"prompt_logprobs must be in [0, {MAX_PROMPT_LOGPROBS}]")


class PromptLogprobRows:
    """The extra hidden rows of one step: their flat token indices, adapter slots, scales, and whose they are."""

    def __init__(self) -> None:
        self.rows: list[int] = []                # flat token index in the step
        self.slots: list[int] = []               # the request's adapter slot (for an adapter on lm_head)
        self.scales: list[float] = []
        self.targets: list[int] = []             # the prompt token each row predicts
        self._owners: list[tuple[object, int]] = []   # (request state, rows it owns), in row order

    def add(self, state, offset: int, count: int, slot: int) -> None:
        """The chunk of `count` tokens at flat `offset`, which start at prompt index `state.computed`."""
        prompt, start = state.request.prompt_ids, state.computed
        end = min(start + count, len(prompt) - 1)         # row j predicts prompt[j + 1]: a prompt token only
        if end <= start:
            return
        self.rows.extend(range(offset, offset + end - start))
        self.targets.extend(prompt[start + 1:end + 1])
        self.slots.extend([slot] * (end - start))
        self.scales.extend([state.request.adapter_scale] * (end - start))
        self._owners.append((state, end - start))

    def __bool__(self) -> bool:
        return bool(self.rows)

    def record(self, logits: torch.Tensor) -> None:
        """logits [len(rows), V] -> each owner's prompt_logprobs extended by its rows' entries."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)                          # [K, V]
        targets = torch.tensor(self.targets, dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()                   # [K]
        at = 0
        for state, count in self._owners:
            k = state.request.prompt_logprobs
            tops: list = [[] for _ in range(count)]
            if k:
                values, ids = torch.topk(logprobs[at:at + count], k, dim=-1)         # [count, k]
                tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            state.prompt_logprobs.extend(zip(chosen[at:at + count], tops))
            at += count
