"""The engine: owns the model's KV cache and runs one forward per step for every running request.

Token ids in, token ids out. `submit` queues a request (any thread); `step` schedules (scheduler.py),
runs one `Decoder.forward_step` over the flattened new tokens of all running requests with every token
mapped to its request's adapter slot (`adapters_core.token_batch`), samples each request that finished
its prompt, and emits `TokenEvent`s. `start()` runs steps in a background thread; `stream()` is the
asyncio view of one request (cancelling the consumer cancels the request, whose slot is freed at the
next step); `generate()` runs a batch to completion in the calling thread (tests, benchmarks).
Isolation: a fault on one request's rows (non-finite logits, an exception in its sampling or, found by
re-running the step's requests one by one, in its part of the forward) finishes that request alone with
`FinishReason.ERROR`. Step listeners (the metrics' gauges) hear of every step, of a step that only
cancelled, and of an idle tick (engine_thread.py, which also holds the thread, the calls between steps and the
asyncio view).
On a GPU, steps of decode tokens only replay a CUDA graph of the forward (cuda_graphs.py).
A request on a prompt-learning adapter starts with the adapter's virtual tokens in its cache slot, its prompt
right after them (virtual_tokens.py); they count against `max_seq_len`. With `grammars` (structured.py) a
request may carry a grammar constraint: its grammar is checked at `validate`, and each step computes the masks
of the constrained requests it samples in one batched call before sampling.
A request's `adapter_scale` multiplies its tokens' LoRA deltas (adapter_scale.py; no work when all are 1),
and a request asking for prompt log-probabilities gets its prompt rows through the head (prompt_logprobs.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

import adapters_core as ac
from service.model import cpu_ops
from service.model.decoder import StepPlan, StepSequence

from .adapter_scale import check_adapter_scale, step_scales
from .cuda_graphs import DecodeGraphs
from .engine_thread import EngineThread, HandOff, StepStats
from .kv_cache import KVCache
from .prompt_logprobs import PromptLogprobRows, check_prompt_logprobs
from .request import FinishReason, GenerationRequest, RequestState, TokenEvent
from .scheduler import Scheduler
from .step_gate import StepGate
from .structured import GrammarFailed, Grammars, check_constraint, guide_for
from .virtual_tokens import VirtualTokens


log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_waiting`; the caller should retry later (HTTP 429)."""


@dataclass
class EngineConfig:
    max_batch_size: int = 16          # running requests = KV cache slots
    max_seq_len: int = 2048           # prompt + generated tokens per request
    max_batch_tokens: int = 512       # new tokens per step (decode tokens + prompt chunks)
    prefill_chunk: int = 256          # most prompt tokens of one request per step
    prefill_while_decoding: int = 0   # prompt tokens per step while requests decode (0: half as many as decode)
    max_waiting: int = 256            # queued requests beyond the running ones
    cuda_graphs: bool = True          # on a GPU, decode-only steps replay captured CUDA graphs (cuda_graphs.py)
    handoff_wait_s: float = 0.0       # after a step, the most to wait for the event loops to take its tokens


class Engine(EngineThread):
    def __init__(self, model, config: EngineConfig = EngineConfig(), eos_token_ids: Sequence[int] = (),
                 grammars: Optional[Grammars] = None):
        self.model = model
        self.grammars = grammars                  # structured output; None: constrained requests are refused
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        weight = model.model.norm.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vocab_size = model.config.vocab_size
        graphs = config.cuda_graphs and DecodeGraphs.applies_to(self.device)
        self.cache = KVCache.for_model(model.config, config.max_batch_size, config.max_seq_len, self.dtype,
                                       self.device, spare_slots=1 if graphs else 0)
        self.graphs = DecodeGraphs(model, self.cache, config.max_batch_size) if graphs else None
        self.scheduler = Scheduler(config.max_batch_tokens, config.prefill_chunk, config.prefill_while_decoding)
        self.virtual_tokens = VirtualTokens(model, self.dtype, self.device, self._adapters)
        self.running: list[RequestState] = []
        self.waiting: deque[RequestState] = deque()
        self._inbox: deque[RequestState] = deque()
        self._cancels: set[str] = set()
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._handoff = HandOff()
        self.last_step = StepStats()
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self.gate = StepGate()                    # held through each step but its C++ loop (step_gate.py)
        model.step_gate = self.gate

    # ----- submitting -----------------------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        """Raise ValueError (bad request) or ac.UnknownAdapterError before anything is queued."""
        request.params.validate(self.vocab_size)
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        virtual = self.virtual_tokens.count(request.adapter)      # a prompt-learning adapter's, before the prompt
        room = 0 if request.scoring else request.params.max_tokens   # (a scoring request's token is dropped)
        if n + virtual + room > self.config.max_seq_len:
            raise ValueError(f"prompt ({n} tokens)" + (f" + the adapter's {virtual} virtual tokens" if virtual else "")
                             + (f" + max_tokens ({room})" if room else "") + " exceeds the "
                             f"context limit of {self.config.max_seq_len} tokens")
        if any(not 0 <= t < self.vocab_size for t in request.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        if request.adapter not in (None, "__base__") and not virtual:
            ac.adapter_slot(self.model, request.adapter)
        check_adapter_scale(self.model, request.adapter, request.adapter_scale)
        check_prompt_logprobs(request.prompt_logprobs)
        check_constraint(self.grammars, request.params.constraint)

    def submit(self, request: GenerationRequest, on_event: Optional[Callable[[TokenEvent], None]] = None) -> None:
        self.validate(request)
        guide = guide_for(self.grammars, request.params.constraint)
        with self._lock:
            if len(self.waiting) + len(self._inbox) >= self.config.max_waiting:
                raise QueueFullError(f"the queue holds {self.config.max_waiting} waiting requests")
            self._inbox.append(RequestState(request, self.vocab_size, time.monotonic(), on_event, self.eos_token_ids,
                                            guide))
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._inbox)

    # ----- one step -------------------------------------------------------------------------------------
    def _take_inbox(self) -> None:
        with self._lock:
            while self._inbox:
                self.waiting.append(self._inbox.popleft())
            cancels, self._cancels = self._cancels, set()
        if cancels:
            for state in list(self.running) + list(self.waiting):
                if state.request.request_id in cancels:
                    self._finish(state, FinishReason.CANCELLED)

    def _finish(self, state: RequestState, reason: FinishReason, error: Optional[str] = None,
                stop_token: Optional[tuple] = None, client_error: bool = False) -> None:
        state.finish_reason = reason
        state.finish_time = time.monotonic()
        if state in self.running:
            self.running.remove(state)
        if state in self.waiting:
            self.waiting.remove(state)
        if state.slot is not None:
            self.cache.release(state.slot)
            state.slot = None
        self._emit(state, TokenEvent(None, None, reason, error, stop_token=stop_token, client_error=client_error))

    def _slot(self, adapter: Optional[str]) -> int:
        if adapter in (None, "__base__") or self.virtual_tokens.count(adapter):     # prompt learning: base weights
            return 0
        return ac.adapter_slot(self.model, adapter)

    @torch.inference_mode()
    def step(self) -> list[RequestState]:
        """Run one step; return the requests that finished in it. A failure on one request's rows (an
        exception in its part of the forward or in its sampling, non-finite logits) finishes that request
        alone with `FinishReason.ERROR`; every other request gets exactly what a step without it gives."""
        with self.gate.step():
            return self._step()

    def _step(self) -> list[RequestState]:
        start = time.perf_counter()
        self._take_inbox()
        plan_items = self.scheduler.schedule(self.running, self.waiting, self.cache)
        if not plan_items:
            self._notify(StepStats())      # cancellations emptied the batch: the gauges must say so now
            return []
        finished: list[RequestState] = []
        try:
            sampled, logits = self._forward(plan_items)
        except Exception as exc:           # whose rows failed is unknown: run each request alone to find out
            log.warning("engine step of %d requests failed (%s: %s); running them one by one", len(plan_items),
                        type(exc).__name__, exc)
            sampled, logits = self._forward_each(plan_items, finished)
        now = time.monotonic()
        finite, argmax = cpu_ops.finite_rows_and_argmax(logits) if sampled else ([], [])
        if self.grammars is not None:          # the constrained requests' masks, in one call
            self.grammars.fill(state.sampler.guide for state in sampled)
        greedy_tokens = {i: argmax[i] for i, state in enumerate(sampled) if finite[i] and state.sampler.plain_greedy}
        for i, state in enumerate(sampled):
            if not finite[i]:
                self._fail(state, "the model produced non-finite logits (NaN or inf) for this request"
                           + (f" on adapter {state.request.adapter!r}" if state.request.adapter else ""), finished)
                continue
            try:
                token, logprob, top = ((greedy_tokens[i], None, None) if i in greedy_tokens
                                       else state.sampler.sample(logits[i]))
            except GrammarFailed as exc:           # the request's own grammar: its client's error
                self._fail(state, str(exc), finished, client_error=True)
                continue
            except Exception as exc:
                self._fail(state, f"sampling failed: {type(exc).__name__}: {exc}", finished)
                continue
            if state.first_token_time is None:
                state.first_token_time = now
            reason = self._stop_reason(state, token)
            if reason is not FinishReason.STOP:
                state.output_ids.append(token)
                state.logprobs.append(logprob)
                self._emit(state, TokenEvent(token, logprob, top_logprobs=top))
            if reason is None and state.virtual + state.computed + 1 >= self.config.max_seq_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                self._finish(state, reason, stop_token=(token, logprob, top) if reason is FinishReason.STOP else None)
                finished.append(state)
        self.last_step = StepStats(len(plan_items), sum(n for _, n in plan_items), time.perf_counter() - start)
        self._notify(self.last_step)
        return finished

    def _forward(self, plan_items: list[tuple[RequestState, int]]) -> tuple[list[RequestState], Optional[torch.Tensor]]:
        """One forward over `plan_items`: (requests to sample, their logits [len, V]). On an exception every
        request's progress is put back, so the same items can run again (their cache rows are rewritten)."""
        computed = [state.computed for state, _ in plan_items]
        try:
            return self._forward_once(plan_items)
        except BaseException:
            for (state, _), c in zip(plan_items, computed):
                state.computed = c
            raise

    def _forward_once(self, plan_items):
        tokens, positions, sequences, slots, sample_at, sampled = [], [], [], [], [], []
        scales, prompt_rows = [], PromptLogprobRows()         # adapter_scale per item; rows of prompt logprobs
        for state, n in plan_items:
            ids = state.all_ids[state.computed:state.computed + n]
            offset = len(tokens)
            tokens.extend(ids)
            if state.computed == 0:          # admission: a prompt-learning adapter's virtual tokens come first
                state.virtual = self.virtual_tokens.count(state.request.adapter)
                if state.virtual:
                    self.virtual_tokens.write(self.cache, state.slot, state.request.adapter)
            start = state.virtual + state.computed          # cache position of the first new token
            positions.extend(range(start, start + n))
            sequences.append(StepSequence(state.slot, start, n))
            slot = self._slot(state.request.adapter)
            slots.extend([slot] * n)
            scales.append((state.request.adapter_scale, n))
            if state.request.prompt_logprobs is not None and state.prefilling:
                prompt_rows.add(state, offset, n, slot)
            if state.computed + n == len(state.all_ids):       # everything known is computed: sample next
                sample_at.append(offset + n - 1)
                sampled.append((state, slot))
            state.computed += n
        device = self.device
        plan = StepPlan(sequences, torch.tensor(sample_at + prompt_rows.rows, dtype=torch.long, device=device))
        slot_t = torch.tensor(slots, dtype=torch.long)          # host: token_batch moves the mapping it builds
        scale_t = step_scales(scales)
        with self._adapters(slot_t, scales=scale_t):
            hidden = (self.graphs.run(plan, tokens, positions, slots)          # a decode-only step, from a graph
                      if self.graphs is not None and scale_t is None else None)
            if hidden is None:                     # the eager forward (a graph copies its inputs itself)
                token_t = torch.tensor(tokens, dtype=torch.long, device=device)
                pos_t = torch.tensor(positions, dtype=torch.long, device=device)
                hidden = self.model.forward_step(token_t, pos_t, plan, self.cache)
        logits = None
        if sampled or prompt_rows:
            head = self.model.lm_head
            if isinstance(head, (ac.AdapterLayer, ac.ModulesToSaveWrapper)):   # an adapter may change the head
                head_slots = [s for _, s in sampled] + prompt_rows.slots
                head_scales = [(state.request.adapter_scale, 1) for state, _ in sampled] + \
                    [(scale, 1) for scale in prompt_rows.scales]
                with self._adapters(torch.tensor(head_slots, dtype=torch.long), sync=False,
                                    scales=step_scales(head_scales)):
                    logits = head(hidden)
            else:
                logits = head(hidden)
            if prompt_rows:
                prompt_rows.record(logits[len(sampled):])
                logits = logits[:len(sampled)]
        return [state for state, _ in sampled], logits

    def _forward_each(self, plan_items, finished: list[RequestState]):
        """After a failed batched forward: each request alone; those that fail again are finished with ERROR."""
        sampled, rows = [], []
        for item in plan_items:
            try:
                states, logits = self._forward([item])
            except Exception as exc:
                self._fail(item[0], f"{type(exc).__name__}: {exc}", finished)
                continue
            sampled += states
            if logits is not None:
                rows.append(logits)
        return sampled, (torch.cat(rows) if rows else None)

    def _fail(self, state: RequestState, message: str, finished: list[RequestState],
              client_error: bool = False) -> None:
        """Finish one request with ERROR (`client_error`: caused by its own input, see TokenEvent). Its cache
        rows are zeroed: a later request on the slot must never read (even behind an attention mask, where
        0 * NaN is NaN) what the failed one left there."""
        log.warning("request %s failed: %s", state.request.request_id, message)
        if state.slot is not None:
            length = state.virtual + max(state.computed, len(state.all_ids))     # virtual tokens included
            self.cache.clear(state.slot, min(self.cache.max_seq_len, length))
        self._finish(state, FinishReason.ERROR, message, client_error=client_error)
        finished.append(state)

    def _notify(self, stats: StepStats) -> None:
        for listener in self.step_listeners:
            try:
                listener(stats)
            except Exception:             # metrics must never stop the engine
                log.exception("engine step listener failed")

    def _emit(self, state: RequestState, event: TokenEvent) -> None:
        """Hand `event` to its consumer; a consumer that cannot take it (its event loop closed) is cancelled
        rather than failing the step for everyone."""
        if state.prompt_logprobs is not None and not state.prompt_logprobs_sent:   # with the first event
            event.prompt_logprobs, state.prompt_logprobs_sent = state.prompt_logprobs, True
        if state.on_event is None:
            return
        try:
            state.on_event(event)
        except Exception:
            log.warning("request %s: its consumer cannot take events; cancelling it", state.request.request_id)
            state.on_event = None
            with self._lock:
                self._cancels.add(state.request.request_id)

    def _adapters(self, slot_t: torch.Tensor, sync: bool = True, scales: Optional[torch.Tensor] = None):
        # With adapters on the model, base requests need the mapping too (slot 0), or the plain forward
        # would apply whatever adapter is "active" in the PEFT sense.
        if not getattr(self.model, "peft_config", None):
            return contextlib.nullcontext()
        # Adapters change only through the registry's adapters_core calls (between steps), which invalidate
        # the stacked copies they touch: the per-step scan for other in-place edits is skipped.
        return ac.token_batch(self.model, slot_t, sync=sync, check_edits=False, scales=scales)

    def _stop_reason(self, state: RequestState, token: int) -> Optional[FinishReason]:
        params = state.request.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if len(state.output_ids) + 1 >= params.max_tokens:
            return FinishReason.LENGTH
        return None
