"""Sampling: turning a request's logits into its next token, reproducibly per request.

Each request has its own `torch.Generator` (seeded from `seed`, else from the global RNG), so the same
seed gives the same tokens whatever else shares the batch. Order of processing follows vLLM: `min_tokens`
(end-of-sequence and stop token ids masked until that many tokens exist), `logit_bias`, the repetition
penalty (Hugging Face's and vLLM's: over prompt and generated tokens, positive logits divided by it, negative
ones multiplied), presence and frequency penalties over the generated tokens (OpenAI's; on the TGI routes the
frequency penalty is TGI's: each token's share of the prompt and generated tokens), temperature (0 = greedy),
top-k, top-p, typical-p (TGI's `typical_p`), min-p. Every feature is per request and costs nothing to
requests that do not use it; those that use none and are greedy never reach `sample` (the engine takes one
batched argmax for them). The log-probability reported for a chosen token, and the `top_logprobs` most likely
alternatives, are taken from the model's raw distribution (vLLM's default), before any of the above.
A request with a grammar `constraint` (structured.py) has a `Guide` whose mask is applied before everything
else, and which the chosen token advances.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from .structured import Constraint, Guide

# seeds for requests that set none: Python's generator (seeded from the OS), not a torch op, which on the event
# loop let the GIL go and waited to take it back from a busy loader or engine (60 us a request on average)
_SEEDS = random.Random()


# Temperatures this small sample the argmax anyway, and dividing by them overflows the logits to inf
# (softmax then gives NaN): treat them as greedy, as vLLM does with its 1e-5 epsilon.
GREEDY_BELOW = 1e-5
MAX_TOP_LOGPROBS = 20          # OpenAI's chat limit (completions: 5)
MAX_LOGIT_BIAS = 100.0         # OpenAI's range for a bias, either sign

TopLogprobs = list[tuple[int, float]]


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 = no top-k
    min_p: float = 0.0                 # 0 = no min-p
    typical_p: float = 1.0             # typical decoding's probability mass (TGI's); 1 = none
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # TGI's and LoRAX's frequency penalty (their routes): a token's count over the prompt and the generated
    # tokens, divided by their number, instead of OpenAI's count over the generated tokens
    frequency_over_context: bool = False
    repetition_penalty: float = 1.0    # 1 = none
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    min_tokens: int = 0                # EOS and stop_token_ids are masked until this many tokens exist
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False             # the chosen token's log-probability
    top_logprobs: int = 0              # and this many most likely tokens with theirs (needs logprobs)
    constraint: Optional[Constraint] = None    # structured output: a grammar the tokens must follow

    def validate(self, vocab_size: Optional[int] = None) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if not 0 < self.typical_p <= 1:
            raise ValueError("typical_p must be in (0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError("repetition_penalty must be a finite number > 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be in [0, max_tokens ({self.max_tokens})]")
        if self.constraint is not None and (self.ignore_eos or self.min_tokens):
            raise ValueError(f"{'ignore_eos' if self.ignore_eos else 'min_tokens'}: cannot be combined with "
                             f"structured output ({self.constraint.field}): the grammar decides where it ends")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        for token, bias in self.logit_bias.items():
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias for token {token} must be in [-100, 100]")
        if vocab_size is not None:
            for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
                bad = next((t for t in ids if not 0 <= t < vocab_size), None)
                if bad is not None:
                    raise ValueError(f"{name}: token id {bad} is not in [0, {vocab_size})")


class RequestSampler:
    """Per-request sampling state: its generator, the tokens it has seen and the counts of those it generated."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Iterable[int] = (),
                 eos_token_ids: Iterable[int] = (), guide: Optional[Guide] = None):
        self.params = p = params
        self.guide = guide                                       # the grammar's matcher, if constrained
        self.generator = torch.Generator()
        seed = p.seed if p.seed is not None else _SEEDS.getrandbits(62)
        self.generator.manual_seed(seed)
        self.generated = 0
        self.counts: Optional[torch.Tensor] = None
        self.context = 0                                         # prompt tokens in `counts` (TGI's penalty)
        if p.presence_penalty or p.frequency_penalty:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32)
            if p.frequency_over_context:
                ids = torch.tensor(list(prompt_ids), dtype=torch.long)
                ids = ids[(ids >= 0) & (ids < vocab_size)]
                self.counts.index_add_(0, ids, torch.ones(ids.numel()))
                self.context = len(ids)
        self.seen: Optional[torch.Tensor] = None                 # [V] bool: in the prompt or generated
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            ids = torch.tensor(list(prompt_ids), dtype=torch.long)
            self.seen[ids[(ids >= 0) & (ids < vocab_size)]] = True
        self.bias: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        if p.logit_bias:
            self.bias = (torch.tensor(list(p.logit_bias), dtype=torch.long),
                         torch.tensor(list(p.logit_bias.values()), dtype=torch.float32))
        self.ends: Optional[torch.Tensor] = None                 # ids masked while under min_tokens
        if p.min_tokens:
            ends = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            self.ends = torch.tensor(sorted(t for t in ends if 0 <= t < vocab_size), dtype=torch.long)

    @property
    def plain_greedy(self) -> bool:
        """The token is the argmax of the raw logits (no penalties, biases, masks or logprobs): the engine
        then takes it for all such requests of a step with one batched argmax instead of calling `sample`."""
        return self.guide is None and self._only_greedy

    @property
    def _only_greedy(self) -> bool:
        p = self.params
        return (p.temperature < GREEDY_BELOW and self.counts is None and self.seen is None and self.bias is None
                and not p.logprobs and (self.ends is None or self.generated >= p.min_tokens))

    def sample(self, logits: torch.Tensor) -> tuple[int, Optional[float], Optional[TopLogprobs]]:
        """logits [V] (any dtype, any device) -> (token id, its raw log-probability if asked, the
        `top_logprobs` most likely (id, log-probability) pairs if asked)."""
        p = self.params
        if self.guide is not None and self._only_greedy:       # the grammar's argmax, without torch ops
            token = self.guide.greedy(logits)
            self.guide.advance(token)
            self.generated += 1
            return token, None, None
        raw = logits.float().cpu()
        logits = self.processed(raw)
        if p.temperature < GREEDY_BELOW:
            token = int(torch.argmax(logits))
        else:
            token = self._draw(self._probs(logits / p.temperature))
        logprob = top = None
        if p.logprobs:
            logprobs = torch.log_softmax(raw, dim=-1)
            logprob = float(logprobs[token])
            if p.top_logprobs:
                values, ids = torch.topk(logprobs, min(p.top_logprobs, logprobs.numel()))
                top = list(zip(ids.tolist(), values.tolist()))
        if self.guide is not None:
            self.guide.advance(token)
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        return token, logprob, top

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        """Raw float logits [V] -> after the grammar's mask, min_tokens, logit_bias and the penalties (a new
        tensor if any apply)."""
        p = self.params
        if self.guide is not None:
            logits = self.guide.apply(logits)
        if self.ends is not None and self.generated < p.min_tokens:
            logits = logits.index_fill(0, self.ends, float("-inf"))
        if self.bias is not None:
            logits = logits.index_add(0, *self.bias)
        if self.seen is not None:
            penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalised, logits)
        if self.counts is not None:
            frequency = self.counts / max(self.context + self.generated, 1) if p.frequency_over_context else self.counts
            logits = logits - p.frequency_penalty * frequency - p.presence_penalty * (self.counts > 0).float()
        return logits

    def _probs(self, scaled: torch.Tensor) -> torch.Tensor:
        """Top-k, top-p, typical-p and min-p over temperature-scaled logits [V] -> probabilities [V]."""
        p = self.params
        if p.top_k and p.top_k < scaled.numel():
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:
            scaled = _top_p(scaled, p.top_p)
        if p.typical_p < 1.0:
            scaled = _typical(scaled, p.typical_p)
        probs = torch.softmax(scaled, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        return probs

    def _draw(self, probs: torch.Tensor) -> int:
        """One token from probabilities [V] (zeros for removed tokens; they need not sum to 1) by inverting
        their cumulative sum at one uniform draw of the request's generator: the distribution of
        `torch.multinomial` (which builds the same cumulative sum), without its ~1 ms on a 49k vocabulary."""
        cumulative = probs.cumsum(0)                                           # [V], non-decreasing
        u = torch.rand(1, generator=self.generator) * cumulative[-1]           # in [0, total)
        token = int(torch.searchsorted(cumulative, u, right=True))             # first index with cum > u
        return min(token, probs.numel() - 1)                                   # (u rounding up to total)


TOP_P_CANDIDATES = 256         # the nucleus is looked for among the most likely tokens first


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling's filter (transformers' TopPLogitsWarper, vLLM's): keep the most likely tokens while
    the probability before them is under `top_p` (at least one); scores [V] -> scores [V], the rest -inf.
    The nucleus is usually a few dozen tokens: it is found among the `TOP_P_CANDIDATES` most likely (one
    top-k instead of sorting the whole vocabulary), with the full sort only when the candidates hold less than
    `top_p` of the probability."""
    probs = torch.softmax(scores, dim=-1)                                      # [V]
    k = min(TOP_P_CANDIDATES, scores.numel())
    top, ids = torch.topk(probs, k)                                            # [k], descending
    before = top.cumsum(0) - top                                               # [k] mass of the tokens ahead
    if k == scores.numel() or before[-1] >= top_p:                             # the nucleus ends among them
        keep = before < top_p
        keep[0] = True        # the most likely token stays even when top_p rounds to 0 in float32
        kept = ids[keep]
        return torch.full_like(scores, float("-inf")).index_copy_(0, kept, scores.index_select(0, kept))
    sorted_scores, order = torch.sort(scores, descending=True)
    sorted_probs = torch.softmax(sorted_scores, dim=-1)
    remove = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    remove[0] = False
    return scores.scatter(0, order, sorted_scores.masked_fill(remove, float("-inf")))


def _typical(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical decoding (Meister et al. 2022; transformers' TypicalLogitsWarper, which TGI applies after top-p):
    keep the tokens whose surprisal is closest to the distribution's entropy until they hold `mass` of its
    probability (at least one token). scores [V] -> scores [V] with the rest at -inf."""
    logp = torch.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum()
    shifted, order = torch.sort((-logp - entropy).abs())
    cumulative = torch.softmax(scores[order], dim=-1).cumsum(-1)
    last = min(int((cumulative < mass).sum()), scores.numel() - 1)
    remove = shifted > shifted[last]
    remove[0] = False
    return scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
