"""A generation request and its running state inside the engine (token ids only, no text)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from .sampling import RequestSampler, SamplingParams, TopLogprobs
from .structured import Guide

_ids = itertools.count()


class FinishReason(str, enum.Enum):
    STOP = "stop"              # an EOS / stop token (or a stop string, decided by the caller)
    LENGTH = "length"          # max_tokens or the context limit
    CANCELLED = "cancelled"    # the client went away or the caller cancelled
    ERROR = "error"


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: Optional[str] = None            # None or "__base__": the base model
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    adapter_scale: float = 1.0               # multiplies the adapter's LoRA delta (adapter_scale.py)
    prompt_logprobs: Optional[int] = None    # None: off; k: each prompt token's log-probability and k likeliest
    # scoring the prompt (vLLM's echo with max_tokens 0): the one token sampled after it is dropped, and needs
    # no room in the context (its key and value are never written)
    scoring: bool = False


@dataclass
class TokenEvent:
    token_id: Optional[int]
    logprob: Optional[float] = None
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None
    top_logprobs: Optional[TopLogprobs] = None     # (id, log-probability) of the most likely tokens, if asked
    # with finish_reason STOP: the EOS or stop token that ended the request (not in its output ids; the API
    # layers count it as generated, as vLLM and TGI do), its log-probability and its most likely tokens when
    # logprobs were asked: (id, log-probability or None, top or None)
    stop_token: Optional[tuple[int, Optional[float], Optional[TopLogprobs]]] = None
    # on a request's first event, when it asked for them: per prompt token (its log-probability, the most
    # likely tokens there), None for the first token
    prompt_logprobs: Optional[list[Optional[tuple[float, TopLogprobs]]]] = None
    # with finish_reason ERROR: the failure came from the request's own input (its grammar failed while it
    # ran), a client error, not the server's
    client_error: bool = False


@dataclass
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[Optional[float]]
    finish_reason: Optional[FinishReason]
    first_token_time: Optional[float] = None
    arrival_time: float = 0.0
    finish_time: Optional[float] = None
    prompt_logprobs: Optional[list[Optional[tuple[float, TopLogprobs]]]] = None


class RequestState:
    """Where a request stands: prompt tokens computed so far, generated tokens, its cache slot."""

    def __init__(self, request: GenerationRequest, vocab_size: int, arrival: float,
                 on_event: Optional[Callable[[TokenEvent], None]] = None, eos_token_ids: Iterable[int] = (),
                 guide: Optional[Guide] = None):
        self.request = request
        self.sampler = RequestSampler(request.params, vocab_size, request.prompt_ids, eos_token_ids, guide)
        self.slot: Optional[int] = None
        self.computed = 0                         # tokens whose keys/values are in the cache
        self.virtual = 0                          # prompt-learning virtual tokens before them (cache 0..virtual-1)
        self.output_ids: list[int] = []
        self.logprobs: list[Optional[float]] = []
        self.finish_reason: Optional[FinishReason] = None
        self.cancelled = False
        self.on_event = on_event
        self.arrival_time = arrival
        self.first_token_time: Optional[float] = None
        self.finish_time: Optional[float] = None
        # filled chunk by chunk while the prompt is computed (prompt_logprobs.py); sent with the first event
        self.prompt_logprobs: Optional[list] = [None] if request.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.request.prompt_ids)

    def output(self) -> RequestOutput:
        r = self.request
        return RequestOutput(r.request_id, r.prompt_ids, list(self.output_ids), list(self.logprobs),
                             self.finish_reason, self.first_token_time, self.arrival_time, self.finish_time,
                             self.prompt_logprobs)
