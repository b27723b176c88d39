"""Sampling: turning a request's logits into its next token, reproducibly per request.

Each request has its own `torch.Generator` (seeded from `seed`, else from the global RNG), so the same
seed gives the same tokens whatever else shares the batch. Order of processing follows vLLM / OpenAI:
presence and frequency penalties over the tokens generated so far, temperature (0 = greedy), top-k,
top-p. The log-probability reported for a chosen token is taken from the model's raw distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


# Temperatures this small sample the argmax anyway, and dividing by them overflows the logits to inf
# (softmax then gives NaN): treat them as greedy, as vLLM does with its 1e-5 epsilon.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 = no top-k
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")


class RequestSampler:
    """Per-request sampling state: its generator and the counts of tokens it generated."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.generator = torch.Generator()
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator.manual_seed(seed)
        self.counts: Optional[torch.Tensor] = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)

    @property
    def plain_greedy(self) -> bool:
        """The token is the argmax of the raw logits (no penalties, no logprob): the engine then takes it
        for all such requests of a step with one batched argmax instead of calling `sample`."""
        p = self.params
        return p.temperature < GREEDY_BELOW and self.counts is None and not p.logprobs

    def sample(self, logits: torch.Tensor) -> tuple[int, Optional[float]]:
        """logits [V] (any dtype, any device) -> (token id, its raw log-probability if asked)."""
        p = self.params
        logits = raw = logits.float().cpu()
        logprob = None
        if self.counts is not None:
            logits = logits - p.frequency_penalty * self.counts - p.presence_penalty * (self.counts > 0).float()
        if p.temperature < GREEDY_BELOW:
            token = int(torch.argmax(logits))
        else:
            scaled = logits / p.temperature
            if p.top_k and p.top_k < scaled.numel():
                kth = torch.topk(scaled, p.top_k).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = torch.sort(scaled, descending=True)
                cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
                remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= p.top_p
                remove[0] = False      # the most likely token stays even when top_p rounds to 0 in float32
                scaled = scaled.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
            probs = torch.softmax(scaled, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        if p.logprobs:
            logprob = float(torch.log_softmax(raw, dim=-1)[token])
        if self.counts is not None:
            self.counts[token] += 1
        return token, logprob
