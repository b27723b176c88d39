"""`EngineThread`: the engine's background thread and the ways other threads reach it.

`start()` runs `Engine.step` in a thread of its own (`_loop`): it sleeps while there is no work, wakes every
`IDLE_TICK_S` to report the gauges, and between two steps runs the calls queued by `call_between_steps`
(everything that changes the model goes through them, so a forward never sees a half-changed model).
`open_stream` / `stream` are the asyncio view of one request (cancelling the consumer cancels it);
`generate()` runs a batch to completion in the calling thread (tests, benchmarks). A mixin of `Engine`,
whose lock, lists and step it drives.

After a step that handed tokens to event loops, the thread waits (at most `EngineConfig.handoff_wait_s`) until
each loop has run the consumers those tokens woke (`HandOff`), then steps again. On a CPU the loop's work per
token (detokenising, the SSE chunk, the socket write: ~0.1-0.5 ms of Python a stream) otherwise runs beside
the next step, on a core the step's matmul threads share, and holds the GIL the step's Python needs: one
stalled half of a matmul split in two makes the other half wait. Done in turn instead, one stream's ITL on
the 2-core Zen 3 fell ~2-3 %; at 16 and 64 streams the change stayed within the machine's swings
(BENCHMARKS.md, thirty-sixth session).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional, Sequence

from .request import FinishReason, GenerationRequest, RequestOutput, TokenEvent

log = logging.getLogger("service.engine.engine")

# While idle the loop wakes this often to report the gauges (running, waiting, KV use) to the listeners.
IDLE_TICK_S = 0.5


@dataclass
class StepStats:
    """What one step did (the step listeners' argument): sequences, tokens computed, wall seconds."""
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0


class EngineThread:
    def cancel_all(self) -> Future:
        """Cancel every queued and running request (a shutdown past its deadline): each ends with
        `FinishReason.CANCELLED` at the next step. Marked on the engine's thread, which owns those lists."""
        def mark() -> int:
            with self._lock:
                ids = {s.request.request_id for s in (*self.running, *self.waiting, *self._inbox)}
                self._cancels |= ids
            return len(ids)
        return self.call_between_steps(mark)

    def call_between_steps(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine's thread between two steps (or at once, in this thread, when no loop runs).
        Everything that changes the model (loading or removing adapters) goes through here, so a forward
        never sees a half-changed model."""
        future: Future = Future()
        if self._thread is None:
            _run_into(fn, future)
            return future
        with self._lock:
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            _run_into(fn, future)

    # ----- running ----------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[RequestOutput]:
        """Run `requests` to completion in this thread (the background loop must not be running)."""
        for request in requests:
            self.submit(request)
        states = {s.request.request_id: s for s in self._inbox}
        while any(s.finish_reason is None for s in states.values()):
            self.step()
        return [states[r.request_id].output() for r in requests]

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._run_calls()          # calls queued after the loop's last turn still get their answer

    def _loop(self) -> None:
        while True:
            idle = False
            with self._lock:
                while not self._stop and not (self.running or self.waiting or self._inbox or self._cancels
                                              or self._calls):
                    if not self._lock.wait(IDLE_TICK_S):
                        idle = True
                        break
                if self._stop:
                    return
            if idle:
                self._notify(StepStats())  # an idle tick: the gauges settle even if no step ran since a change
                continue
            self._run_calls()
            try:
                self.step()
                if self.config.handoff_wait_s > 0:
                    self._handoff.wait(self.config.handoff_wait_s)
            except Exception as exc:  # a failed step must not kill the engine: fail its requests instead
                log.exception("engine step failed")
                for state in list(self.running):
                    self._finish(state, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
                self._notify(StepStats())

    def open_stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit `request` now (so a full queue or a bad request raises here, before any response is sent)
        and return an async iterator of its events; closing the iterator early cancels the request.
        Call from a coroutine: events come back through the running event loop."""
        inbox = _inbox_of(asyncio.get_running_loop())
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        handoff = self._handoff
        self.submit(request, lambda ev: inbox.put(queue, ev, handoff))

        async def events() -> AsyncIterator[TokenEvent]:
            done = False
            try:
                while True:
                    event = await queue.get()
                    done = event.finish_reason is not None    # set before yielding: a consumer may stop here
                    yield event
                    if done:
                        return
            finally:
                if not done:
                    self.cancel(request.request_id)
        return events()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit `request` and yield its events as they come; cancelling the consumer cancels it."""
        events = self.open_stream(request)
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()


class HandOff:
    """The event-loop batches a step's events went out in, not yet run by their consumers: the engine thread
    waits for them before its next step (bounded). Each batch is a `threading.Event` its loop sets once the
    consumers its events woke have run; a batch that never gets there (its loop closed) only costs the bound
    once, as `wait` forgets the batches it waited for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: list[threading.Event] = []

    def track(self, batch: threading.Event) -> None:
        with self._lock:
            if not self._batches or self._batches[-1] is not batch:
                self._batches.append(batch)

    def wait(self, timeout: float) -> bool:
        """Engine thread: wait until every tracked batch was run, at most `timeout` seconds; True if all were."""
        with self._lock:
            batches, self._batches = self._batches, []
        deadline = time.monotonic() + timeout
        for batch in batches:
            if not batch.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True


class LoopInbox:
    """The engine thread's events for one event loop, handed over with one wake-up per batch. Each
    `call_soon_threadsafe` writes a byte to the loop's self-pipe, a system call that lets the GIL go: with
    64 streams the engine thread let it go 64 times a step, and each time the loop (woken by the first byte)
    or the adapter loader took it, the engine waited up to the 5 ms switch interval to go on (64 events
    beside a loop handling them: emitting took p90 4.2 ms, 0.65 ms through this). The first event of a
    batch schedules a drain; later ones only append until the loop has drained. Per request the order
    stays as sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)           # (the inboxes' map holds the loop weakly: so must its value)
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, TokenEvent]] = []
        self._batch: Optional[threading.Event] = None     # set once the consumers this drain wakes have run
        self._scheduled = False

    def put(self, queue: asyncio.Queue, event: TokenEvent, handoff: Optional[HandOff] = None) -> None:
        """Engine thread. Raises RuntimeError once the loop is closed (the engine then cancels the request).
        `handoff` learns the batch this event goes out in."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            raise RuntimeError("the event loop of this request is closed")
        with self._lock:
            self._items.append((queue, event))
            if handoff is not None:
                if self._batch is None:
                    self._batch = threading.Event()
                handoff.track(self._batch)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain)
        except BaseException:
            with self._lock:
                self._scheduled = False
            raise

    def _drain(self) -> None:
        with self._lock:
            items, batch, self._items, self._batch, self._scheduled = self._items, self._batch, [], None, False
        for queue, event in items:
            queue.put_nowait(event)             # each wakes its consumer's task: it runs at the loop's next turn,
        if batch is not None:                   # and this after them (the ready queue runs in order)
            self._loop().call_soon(batch.set)


_INBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopInbox]" = weakref.WeakKeyDictionary()
_INBOXES_LOCK = threading.Lock()


def _inbox_of(loop: asyncio.AbstractEventLoop) -> LoopInbox:
    with _INBOXES_LOCK:
        inbox = _INBOXES.get(loop)
        if inbox is None:
            inbox = _INBOXES[loop] = LoopInbox(loop)
        return inbox


def _run_into(fn: Callable[[], object], future: Future) -> None:
    """Run `fn` and hand its result or error to `future`; a caller that stopped waiting (a cancelled future)
    gets nothing, and the engine thread goes on."""
    try:
        result = fn()
    except BaseException as exc:  # handed to the caller through the future
        outcome = (future.set_exception, exc)
    else:
        outcome = (future.set_result, result)
    try:
        outcome[0](outcome[1])
    except InvalidStateError:
        pass
