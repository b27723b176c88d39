"""`run_first`: a worker thread's result handed to the event loop ahead of the work already queued there.

`loop.run_in_executor` hands a finished job back with `call_soon_threadsafe`, at the end of the loop's ready
queue, and the coroutine awaiting it resumes one iteration later still (the asyncio future's result wakes its
task with another `call_soon`). In a burst of requests an iteration of the loop runs every request intake that
was ready when it began, so a finished adapter read waited two such iterations before its load could attach
and its request go on: the largest part of a start burst's load time (`adapter_serve_adapter_load_resume_seconds`,
BENCHMARKS.md). Here the thread's completion is put at the front of the ready queue, and what setting the result
schedules (the waiting task's wakeup) is moved to the front too, so the coroutine resumes at the loop's next
callback boundary, before the queued intakes. This uses `asyncio.BaseEventLoop`'s ready deque (`_ready`) and
self-pipe wake-up (`_write_to_self`), as `call_soon_threadsafe` does; on any other loop (uvloop, a loop without
them) it falls back to `call_soon_threadsafe`, i.e. to `run_in_executor`'s order.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from typing import Any, Callable


def _front_queue(loop: asyncio.AbstractEventLoop):
    """The loop's ready deque and wake-up call where this loop has asyncio's own, else None."""
    ready = getattr(loop, "_ready", None)
    wake = getattr(loop, "_write_to_self", None)
    if isinstance(loop, asyncio.BaseEventLoop) and isinstance(ready, collections.deque) and callable(wake):
        return ready, wake
    return None


def call_first_threadsafe(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """From any thread: run `callback(*args)` on `loop` before the callbacks already queued there, and what it
    schedules with `call_soon` (a future's done callbacks: a waiting task's wakeup) right after it."""
    front = _front_queue(loop)
    if front is None:
        loop.call_soon_threadsafe(callback, *args)
        return
    ready, wake = front
    if loop.is_closed():
        raise RuntimeError("Event loop is closed")
    ready.appendleft(asyncio.Handle(_run_and_lift, (ready, callback, args), loop, None))
    wake()


def _run_and_lift(ready: collections.deque, callback: Callable[..., Any], args: tuple) -> None:
    """On the loop: `callback(*args)`, then the handles it appended moved, in their order, to the front."""
    before = len(ready)
    callback(*args)
    ready.rotate(len(ready) - before)


async def run_first(executor: concurrent.futures.Executor, fn: Callable[[], Any]) -> Any:
    """`await loop.run_in_executor(executor, fn)`, with the result taken back ahead of the loop's queued work
    (`call_first_threadsafe`). Cancelling the await cancels the job if it has not started, as there."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    job = executor.submit(fn)

    def settle(done: concurrent.futures.Future) -> None:             # on the loop
        if waiter.cancelled():
            return
        if done.cancelled():
            waiter.cancel()
        elif done.exception() is not None:
            waiter.set_exception(done.exception())
        else:
            waiter.set_result(done.result())

    def finished(done: concurrent.futures.Future) -> None:           # on the worker thread (or here, if done)
        try:
            call_first_threadsafe(loop, settle, done)
        except RuntimeError:                                         # the loop closed meanwhile: nobody waits
            pass

    job.add_done_callback(finished)
    try:
        return await waiter
    except asyncio.CancelledError:
        job.cancel()
        raise
