"""Text in, text out: the glue between the HTTP routes and the token-level engine.

`TextGenerator.start` takes a prompt (text or token ids), an adapter name and sampling settings, holds a
registry lease on the adapter for the request's whole life, streams `Piece`s of detokenised text
(stop strings applied where the text is known, after `min_tokens`), and records the request's metrics at
the end. `start_all` submits several sequences (a request's choices or prompts) all or none, so they share
the engine's batch; `merged` interleaves their pieces as they come. The API layer never touches tensors;
the engine never sees text.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Optional, Sequence, TypeVar

from service.adapter_target import AdapterTarget, as_target
from service.engine import Engine, FinishReason, GenerationRequest, SamplingParams
from service.engine.engine import QueueFullError
from service.metrics import Metrics
from service.model.stop_strings import StopStringMatcher
from service.model.tokenizer import IncrementalDecoder, Tokenizer
from service.registry import AdapterRegistry, GenerationFailed, Invalid, Unavailable

T = TypeVar("T")

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
    top_logprobs: Optional[list[tuple[int, float]]] = None
    stop_token: Optional[tuple] = None        # the engine's: the EOS / stop token that ended it (id, logprob, top)
    prompt_logprobs: Optional[list] = None    # on the first piece, when asked: the engine's per prompt token
    error_status: int = 500                   # with "error": 400 when the request's own input failed (its grammar)
    stop_reason: Optional[int | str] = None   # with "stop": the stop string or stop_token_ids id (vLLM's; EOS: None)

    def failure(self) -> GenerationFailed:
        """With finish_reason "error": the error a non-streamed answer raises."""
        return GenerationFailed(self.error or "generation failed", status=self.error_status)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list)    # the EOS / stop token that ended it too (as vLLM's)
    logprobs: list[Optional[float]] = field(default_factory=list)
    top_logprobs: list[Optional[list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    stop_reason: Optional[int | str] = None    # vLLM's: the stop string or stop token id that ended it, else None


@dataclass
class TextOptions:
    """How generated ids become text: stop strings, and vLLM's `include_stop_str_in_output` and
    `skip_special_tokens`; and whether the prompt tokens' log-probabilities come back (None: no; k: with the
    k likeliest tokens at each position)."""
    stop: Sequence[str] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: Optional[int] = None
    # vLLM's include_stop_str_in_output also for the EOS / stop_token_ids token that ended a sequence: its text
    # is decoded into the output like any token's (an EOS skipped as a special token adds nothing)
    include_stop_token: bool = False
    scoring: bool = False              # the prompt scored, its one sampled token dropped (GenerationRequest's)


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

    async def _lease(self, target: AdapterTarget):
        if target.merge is not None:
            return await self.registry.acquire_merged(target.merge)
        return await self.registry.acquire(target.name, wait=True) if target.name else None

    async def _submit(self, prompt_ids: list[int], adapter: AdapterTarget, params: SamplingParams,
                      options: TextOptions):
        """Lease the adapter and submit the request: (lease, request, its events). Every refusal raises here."""
        lease = None
        try:
            try:
                lease = await self._lease(adapter)
            except Unavailable as exc:
                # every device slot holds an adapter of a request in flight: for this request that is the
                # same back-pressure as a full queue, so it gets 429 with Retry-After, not a server error
                raise QueueFullError(str(exc)) from exc
            request = GenerationRequest(prompt_ids, params, lease.model_name if lease else None,
                                        adapter_scale=adapter.scale, prompt_logprobs=options.prompt_logprobs,
                                        scoring=options.scoring)
            try:
                self.engine.validate(request)
            except ValueError as exc:
                raise Invalid(str(exc), status=400) from exc
            return lease, request, self.engine.open_stream(request)
        except BaseException:
            if lease is not None:
                self.registry.release(lease)
            self.metrics.request_rejected(adapter.label, "rejected")
            raise

    async def start(self, prompt_ids: list[int], adapter: AdapterTarget | str | None, params: SamplingParams,
                    stop: Sequence[str] = (), options: Optional[TextOptions] = None) -> AsyncIterator[Piece]:
        """Lease the adapter and submit the request; every refusal (unknown or deactivated adapter, bad
        limits, full queue or no free device slot: 429) raises here, before a streaming response has
        started. Returns the pieces."""
        arrival, target, options = time.monotonic(), as_target(adapter), options or TextOptions(stop)
        lease, request, events = await self._submit(prompt_ids, target, params, options)
        return self._pieces(events, lease, target.label, prompt_ids, params, options, arrival)

    async def start_all(self, jobs: Sequence[tuple[list[int], AdapterTarget | str | None, SamplingParams]],
                        options: TextOptions) -> list[AsyncIterator[Piece]]:
        """Submit every (prompt ids, adapter, params) job or none: if one is refused, those already
        submitted are cancelled and their leases released before the refusal propagates."""
        arrival, submitted, streams = time.monotonic(), [], []
        try:
            for ids, adapter, params in jobs:
                target = as_target(adapter)
                lease, request, events = await self._submit(ids, target, params, options)
                submitted.append((lease, request, target.label))
                streams.append(self._pieces(events, lease, target.label, ids, params, options, arrival))
        except BaseException:
            for lease, request, adapter in submitted:     # their piece generators never started
                self.engine.cancel(request.request_id)
                if lease is not None:
                    self.registry.release(lease)
                self.metrics.request_rejected(adapter, "rejected")
            raise
        return streams

    async def _pieces(self, events, lease, adapter: Optional[str], prompt_ids: list[int], params: SamplingParams,
                      options: TextOptions, arrival: float) -> AsyncIterator[Piece]:
        times: list[float] = []
        outcome, ended = "error", False       # ended: the last piece was handed over (closing after it is no cancel)
        # the prompt's last ids give the first token its left context (a sentencepiece word's leading space, as
        # vLLM's and TGI's detokenizers keep it)
        decoder = IncrementalDecoder(self.tokenizer, options.skip_special_tokens, prompt_ids=prompt_ids)
        matcher = StopStringMatcher(options.stop, options.include_stop)
        prompt_logprobs = None              # the engine sends them with the first event; on the first piece here
        try:
            async for event in events:
                if event.prompt_logprobs is not None:
                    prompt_logprobs = event.prompt_logprobs
                if event.token_id is not None:
                    times.append(time.monotonic())
                    self.metrics.token_generated()
                    text = decoder.push(event.token_id)
                    # vLLM: no stop string ends a sequence before min_tokens
                    text, stopped = matcher.feed(text) if len(times) >= params.min_tokens else (text, False)
                    if stopped:
                        outcome, ended = "success", True
                        yield Piece(text, event.token_id, event.logprob, "stop", top_logprobs=event.top_logprobs,
                                    prompt_logprobs=prompt_logprobs, stop_reason=matcher.matched)
                        return
                    yield Piece(text, event.token_id, event.logprob, top_logprobs=event.top_logprobs,
                                prompt_logprobs=prompt_logprobs)
                    prompt_logprobs = None
                if event.finish_reason is not None:
                    if event.finish_reason == FinishReason.ERROR:    # this request alone failed in the engine:
                        message = f"generation failed: {event.error or 'engine error'}"   # streams end normally
                        self.metrics.generation_failed(adapter, message)
                        ended = True
                        yield Piece("", finish_reason="error", error=message,
                                    error_status=400 if event.client_error else 500)
                        return
                    if event.stop_token is not None:      # a generated token too (vLLM's usage, TGI's details)
                        times.append(time.monotonic())
                        self.metrics.token_generated()
                    last = (decoder.push(event.stop_token[0])
                            if options.include_stop_token and event.stop_token is not None else "")
                    tail, _ = matcher.feed(last + decoder.flush())
                    tail += matcher.flush()
                    outcome = "success" if event.finish_reason != FinishReason.CANCELLED else "cancelled"
                    ended = True
                    reason = _REASONS.get(event.finish_reason, "stop")
                    stop_reason = ((matcher.matched or self._stop_token_reason(event.stop_token, params))
                                   if reason == "stop" else None)
                    yield Piece(tail, finish_reason=reason, stop_token=event.stop_token, prompt_logprobs=prompt_logprobs,
                                stop_reason=stop_reason)
                    return
        except (GeneratorExit, asyncio.CancelledError):    # the consumer closed us or its task was cancelled
            if not ended:                     # (a consumer may close us right after the last piece: TGI streams)
                outcome = "cancelled"
            raise
        finally:
            await events.aclose()             # cancels the request in the engine if it is still running
            if lease is not None:
                self.registry.release(lease)
            self.metrics.request_finished(adapter, outcome, len(prompt_ids), times, arrival, time.monotonic())

    def _stop_token_reason(self, stop_token: Optional[tuple], params: SamplingParams) -> Optional[int]:
        """vLLM's `stop_reason` for a sequence ended by a token: the id when it is one of the request's
        `stop_token_ids`, None for the model's EOS (which vLLM checks first)."""
        if stop_token is None or stop_token[0] not in params.stop_token_ids:
            return None
        return None if not params.ignore_eos and stop_token[0] in self.engine.eos_token_ids else stop_token[0]

    async def complete(self, prompt_ids: list[int], adapter: AdapterTarget | str | None, params: SamplingParams,
                       stop: Sequence[str] = (), options: Optional[TextOptions] = None) -> Completion:
        return await collect(await self.start(prompt_ids, adapter, params, stop, options), len(prompt_ids))


async def collect(pieces: AsyncIterator[Piece], prompt_tokens: int) -> Completion:
    """A whole completion from its pieces (GenerationFailed if the engine failed it)."""
    text, ids, logprobs, tops, reason, prompt_logprobs, stop_reason = [], [], [], [], "stop", None, None
    try:
        async for piece in pieces:
            text.append(piece.text)
            prompt_logprobs = prompt_logprobs or piece.prompt_logprobs
            if piece.token_id is not None:
                ids.append(piece.token_id)
                logprobs.append(piece.logprob)
                tops.append(piece.top_logprobs)
            if piece.stop_token is not None:           # the EOS / stop token: counted and listed, as vLLM does
                token_id, logprob, top = piece.stop_token
                ids.append(token_id)
                logprobs.append(logprob)
                tops.append(top)
            if piece.finish_reason == "error":
                raise piece.failure()
            if piece.finish_reason:
                reason, stop_reason = piece.finish_reason, piece.stop_reason
    finally:
        await pieces.aclose()
    return Completion("".join(text), prompt_tokens, len(ids), reason, ids, logprobs, tops, prompt_logprobs,
                      stop_reason)


async def gather_all(works: Sequence[Awaitable[T]]) -> list[T]:
    """Every result, or the first failure with the others cancelled (their engine requests and leases freed)."""
    tasks = [asyncio.ensure_future(work) for work in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merged(streams: Sequence[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(stream index, piece) from every stream as the pieces come; closing this closes them all."""
    if len(streams) == 1:
        try:
            async for piece in streams[0]:
                yield 0, piece
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Piece]) -> None:
        try:
            async for piece in stream:
                await queue.put((index, piece))
        finally:
            await stream.aclose()
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, piece = await queue.get()
            if piece is None:
                remaining -= 1
            else:
                yield index, piece
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
