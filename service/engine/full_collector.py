"""`FullCollector`: Python's full garbage collections on a schedule, beside a step's C++ loop.

A full (generation 2) collection visits every tracked object the process holds, with the GIL held; Python
starts one on its own whenever a quarter more objects have survived into the oldest generation, in whichever
thread allocates at that moment, and that is usually the engine thread in the middle of a step. Resident
adapters are most of those objects (a SmolLM2 adapter on q/v is ~2,300: its 120 `nn.Linear` and their hook
dicts), so with 1,000 adapters in rotation (a load every ~80 ms) measured over 30 s: 8 automatic full
collections, up to 127 ms each, all inside steps that admitted requests (14.5 ms added to such a step on
average). Here the automatic full collections are turned off (generation 2's threshold, while any collector
runs) and a thread runs `gc.collect()` every `interval` seconds holding the engine's step gate
(`step_gate.py`): it waits for a step's C++ loop (which runs without the GIL and needs none of the objects
the collection visits) or for the step's end, so the collection overlaps that loop instead of stopping the
step. Young collections stay automatic and cheap, and find most garbage cycles (a request's) while they are
young; a cycle whose objects lived through two of them waits for the next scheduled collection, so memory
it holds is returned up to `interval` seconds later than Python's own schedule would.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from typing import Optional

log = logging.getLogger("service.engine")

_NEVER = 2**31 - 1                 # generation 2's threshold while a collector runs: no automatic full collection
_active = 0                        # collectors running in this process (tests start several apps)
_saved: Optional[tuple[int, int, int]] = None
_state_lock = threading.Lock()


class FullCollector:
    def __init__(self, gate, interval: float):
        """`gate`: the engine's `StepGate` (any context manager: taken around each collection); `interval`:
        seconds between two collections (> 0). Each collection is timed by the metrics' `watch_gc` like any."""
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.gate, self.interval = gate, interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        global _active, _saved
        with _state_lock:
            if _active == 0:
                _saved = gc.get_threshold()
                gc.set_threshold(_saved[0], _saved[1], _NEVER)
            _active += 1
        self._thread = threading.Thread(target=self._run, name="full-gc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; the last collector to stop gives Python its own schedule back."""
        global _active, _saved
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with _state_lock:
            _active -= 1
            if _active == 0 and _saved is not None:
                if gc.get_threshold()[2] == _NEVER:       # (unless someone set their own meanwhile)
                    gc.set_threshold(*gc.get_threshold()[:2], _saved[2])
                _saved = None

    def collect_now(self) -> float:
        """One full collection under the gate; its seconds (the GIL-held part)."""
        with self.gate:
            started = time.perf_counter()
            gc.collect()
            return time.perf_counter() - started

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.collect_now()
            except Exception:           # a finalizer that raises must not end the schedule
                log.exception("scheduled garbage collection failed")
