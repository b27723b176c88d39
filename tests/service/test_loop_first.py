"""`run_first`: a worker's result is taken back by the event loop ahead of the callbacks queued there (a burst's
request intakes), where `run_in_executor` resumes the awaiting coroutine only after two full iterations of them;
results, exceptions and cancellation behave as `run_in_executor`'s; another kind of loop gets the plain order."""
import asyncio
import concurrent.futures
import threading
import time

import pytest

from service.loop_first import call_first_threadsafe, run_first


def _intakes_before_resume(use_first: bool, queued: int = 40) -> int:
    """How many queued callbacks ran between a worker finishing and the coroutine awaiting it resuming, while the
    loop always has `queued` callbacks ready (each re-queues itself: requests arriving all the time)."""
    executor = concurrent.futures.ThreadPoolExecutor(1)
    release, finished = threading.Event(), threading.Event()

    def job():
        release.wait(5)
        finished.set()
        return "read"

    async def main():
        loop = asyncio.get_running_loop()
        log, stop = [], False

        def intake():
            log.append(finished.is_set())
            time.sleep(0.0002)                       # (a request's intake holds the loop a little)
            if not stop:
                loop.call_soon(intake)

        for _ in range(queued):
            loop.call_soon(intake)
        loop.call_later(0.02, release.set)
        waiting = run_first(executor, job) if use_first else loop.run_in_executor(executor, job)
        assert await waiting == "read"
        stop = True
        return sum(log)                              # intakes that ran after the job had finished

    try:
        return asyncio.run(main())
    finally:
        executor.shutdown()


def test_the_result_is_taken_back_ahead_of_queued_callbacks():
    assert _intakes_before_resume(use_first=False) >= 40          # the plain order: behind a full iteration
    assert _intakes_before_resume(use_first=True) <= 5


def test_exceptions_and_cancellation_behave_as_run_in_executor():
    executor = concurrent.futures.ThreadPoolExecutor(1)
    gate = threading.Event()

    def fail():
        raise ValueError("bad file")

    async def main():
        with pytest.raises(ValueError, match="bad file"):
            await run_first(executor, fail)
        blocker = asyncio.ensure_future(run_first(executor, lambda: gate.wait(5)))
        await asyncio.sleep(0.01)
        ran = []
        queued = asyncio.ensure_future(run_first(executor, lambda: ran.append(1)))   # behind the blocker
        await asyncio.sleep(0.01)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.set()
        assert await blocker is True
        await asyncio.sleep(0.05)
        return ran

    try:
        assert asyncio.run(main()) == []               # cancelled before it started: never ran
    finally:
        executor.shutdown()


def test_another_kind_of_loop_gets_call_soon_threadsafe():
    class OtherLoop:                                   # (uvloop's has no `_ready` deque)
        def __init__(self):
            self.calls = []

        def call_soon_threadsafe(self, callback, *args):
            self.calls.append((callback, args))

    loop = OtherLoop()
    call_first_threadsafe(loop, print, "x")
    assert loop.calls == [(print, ("x",))]
