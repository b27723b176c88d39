"""Text in, text out: the glue between the HTTP routes and the token-level engine.

`TextGenerator.start` takes a prompt (text or token ids), an adapter name and sampling settings, holds a
registry lease on the adapter for the request's whole life, streams `Piece`s of detokenised text
(stop strings applied where the text is known), and records the request's metrics at the end. The API
layer never touches tensors; the engine never sees text.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence

from service.engine import Engine, FinishReason, GenerationRequest, SamplingParams
from service.engine.engine import QueueFullError
from service.metrics import Metrics
from service.model.stop_strings import StopStringMatcher
from service.model.tokenizer import IncrementalDecoder, Tokenizer
from service.registry import AdapterRegistry
from service.registry_errors import GenerationFailed, Invalid, Unavailable


# The finish reason a client sees: "cancelled" only reaches one still listening, i.e. requests the server
# stopped itself (a shutdown past its deadline).
_REASONS = {FinishReason.LENGTH: "length", FinishReason.CANCELLED: "cancelled"}


@dataclass
class Piece:
    text: str
    token_id: Optional[int] = None
    logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None               # with finish_reason "error": what went wrong (this request only)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Optional[float]] = field(default_factory=list)


class TextGenerator:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, registry: AdapterRegistry, metrics: Metrics,
                 max_prompt_tokens: int):
        self.engine, self.tokenizer, self.registry, self.metrics = engine, tokenizer, registry, metrics
        self.max_prompt_tokens = max_prompt_tokens

    def encode(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt, add_special_tokens)
        if not ids:
            raise Invalid("the prompt is empty", status=400)
        if len(ids) > self.max_prompt_tokens:
            raise Invalid(f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}", status=400)
        return ids

    async def start(self, prompt_ids: list[int], adapter: Optional[str], params: SamplingParams,
                    stop: Sequence[str] = ()) -> AsyncIterator[Piece]:
        """Lease the adapter and submit the request; every refusal (unknown or deactivated adapter, bad
        limits, full queue or no free device slot: 429) raises here, before a streaming response has
        started. Returns the pieces."""
        lease, arrival = None, time.monotonic()
        try:
            try:
                lease = await self.registry.acquire(adapter) if adapter else None
            except Unavailable as exc:
                # every device slot holds an adapter of a request in flight: for this request that is the
                # same back-pressure as a full queue, so it gets 429 with Retry-After, not a server error
                raise QueueFullError(str(exc)) from exc
            request = GenerationRequest(prompt_ids, params, lease.model_name if lease else None)
            try:
                self.engine.validate(request)
            except ValueError as exc:
                raise Invalid(str(exc), status=400) from exc
            events = self.engine.open_stream(request)
        except BaseException:
            if lease is not None:
                self.registry.release(lease)
            self.metrics.request_rejected(adapter, "rejected")
            raise
        return self._pieces(events, lease, adapter, len(prompt_ids), stop, arrival)

    async def _pieces(self, events, lease, adapter: Optional[str], prompt_tokens: int, stop: Sequence[str],
                      arrival: float) -> AsyncIterator[Piece]:
        times: list[float] = []
        outcome = "error"
        decoder = IncrementalDecoder(self.tokenizer)
        matcher = StopStringMatcher(stop)
        try:
            async for event in events:
                if event.token_id is not None:
                    times.append(time.monotonic())
                    text, stopped = matcher.feed(decoder.push(event.token_id))
                    if stopped:
                        outcome = "success"
                        yield Piece(text, event.token_id, event.logprob, "stop")
                        return
                    yield Piece(text, event.token_id, event.logprob)
                if event.finish_reason is not None:
                    if event.finish_reason == FinishReason.ERROR:    # this request alone failed in the engine:
                        message = f"generation failed: {event.error or 'engine error'}"   # streams end normally
                        yield Piece("", finish_reason="error", error=message)
                        return
                    tail, _ = matcher.feed(decoder.flush())
                    tail += matcher.flush()
                    outcome = "success" if event.finish_reason != FinishReason.CANCELLED else "cancelled"
                    reason = _REASONS.get(event.finish_reason, "stop")
                    yield Piece(tail, finish_reason=reason)
                    return
        except (GeneratorExit, asyncio.CancelledError):    # the consumer closed us or its task was cancelled
            outcome = "cancelled"
            raise
        finally:
            await events.aclose()             # cancels the request in the engine if it is still running
            if lease is not None:
                self.registry.release(lease)
            self.metrics.request_finished(adapter, outcome, prompt_tokens, times, arrival, time.monotonic())

    async def complete(self, prompt_ids: list[int], adapter: Optional[str], params: SamplingParams,
                       stop: list[str] = ()) -> Completion:
        text, ids, logprobs, reason = [], [], [], "stop"
        async for piece in await self.start(prompt_ids, adapter, params, stop):
            text.append(piece.text)
            if piece.token_id is not None:
                ids.append(piece.token_id)
                logprobs.append(piece.logprob)
            if piece.finish_reason == "error":
                raise GenerationFailed(piece.error or "generation failed")
            if piece.finish_reason:
                reason = piece.finish_reason
        return Completion("".join(text), len(prompt_ids), len(ids), reason, ids, logprobs)
