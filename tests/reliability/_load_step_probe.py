"""`StepProbe`: watches a live engine step by step, without changing what it does.

It wraps the engine's `step` (to number each step as it begins and note which requests run and wait after it)
and `cancel` (to note the number of the last step begun when the server asked to cancel a request, i.e. when
it saw the client go away). The wrapped methods still do all the work; the probe only records."""
from __future__ import annotations

import threading
import time


class StepProbe:
    def __init__(self, engine):
        self.engine = engine
        self.started = 0                              # steps begun so far
        self.after: list[tuple[int, set[str]]] = []   # (step number, ids running or waiting after it)
        self.cancel_asked: dict[str, int] = {}        # request id -> steps begun when cancel() was called
        self.waiting: set[str] = set()                # ids waiting for a slot after the last step
        self._changed = threading.Condition()
        step, cancel = engine.step, engine.cancel

        def probed_step():
            with self._changed:
                self.started += 1
                number = self.started
            try:
                return step()
            finally:
                waiting = {s.request.request_id for s in engine.waiting}
                held = waiting | {s.request.request_id for s in engine.running}
                with self._changed:
                    self.waiting = waiting
                    self.after.append((number, held))
                    self._changed.notify_all()

        def probed_cancel(request_id):
            with self._changed:
                self.cancel_asked.setdefault(request_id, self.started)
            cancel(request_id)

        engine.step, engine.cancel = probed_step, probed_cancel

    def held(self) -> set[str]:
        with self._changed:
            return set(self.after[-1][1]) if self.after else set()

    def wait_for(self, predicate, timeout: float = 30.0):
        """Block until predicate(self) is truthy (checked after each step); return its value."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (value := predicate(self)):
                if not self._changed.wait(deadline - time.monotonic()) and time.monotonic() > deadline:
                    raise TimeoutError("the engine did not get there in time")
            return value

    def new_request(self, before: set[str], timeout: float = 30.0) -> str:
        """The one request id held by the engine now that was not in `before`."""
        fresh = self.wait_for(lambda p: p.after and (p.after[-1][1] - before), timeout)
        assert len(fresh) == 1, fresh
        return next(iter(fresh))

    def step_freed(self, request_id: str, timeout: float = 30.0) -> int:
        """The number of the first step after which `request_id` is neither running nor waiting."""
        def freed(p):
            asked = p.cancel_asked.get(request_id)
            if asked is None:
                return None
            return next((n for n, held in p.after if n > asked and request_id not in held), None)
        return self.wait_for(freed, timeout)
