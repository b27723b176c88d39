"""`FullCollector`: Python's full garbage collections, moved beside a step's C++ loop and kept small.

A full (generation 2) collection visits every tracked object the process holds, with the GIL held; Python
starts one on its own in whichever thread allocates when one is due, and that is usually the engine thread in
the middle of a step. Resident adapters are most of those objects (a SmolLM2 adapter on q/v is ~2,300: its
120 `nn.Linear` and their hook dicts, ~290,000 for 128 resident; ~790 since those modules make their hook
containers on first use, `adapters_core/held_linear.py`), so with 1,000 adapters in rotation (a load
every ~80 ms) measured over 30 s: 8 automatic full collections, up to 127 ms each, all inside steps that
admitted requests (14.5 ms added to such a step on average). Moving the same collections beside the step
was not enough (each still held the GIL ~100 ms and a core the step's kernels wanted), and making them rarer
(one a minute) let garbage cycles wait: the load test's server grew 16 % during its run.

So: generation 2's automatic threshold is off while a collector runs, and its thread watches the count
Python uses to decide (`gc.get_count()[2]`, generation-1 collections since the last full one, every `poll`
seconds). When that passes Python's own threshold (10 by default), it runs `gc.collect()` and then
`gc.freeze()` holding the engine's step gate (`step_gate.py`: it waits for a step's C++ loop, which runs
without the GIL, or for the step's end). Everything that survived is moved out of later collections, so the
next one visits only what was made since: the adapters loaded since, the requests in flight. Every
`full_interval` seconds the frozen objects are put back first (`gc.unfreeze()`), so a cycle among them (an
object that lived through a collection and became garbage later) is found at most that much later.
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
    def __init__(self, gate, poll: float = 0.05, full_interval: float = 60.0):
        """`gate`: the engine's `StepGate` (any context manager: taken around each collection); `poll`: seconds
        between two looks at the count; `full_interval`: seconds between two collections of everything (both
        > 0). Each collection is timed by the metrics' `watch_gc` like any."""
        if poll <= 0 or full_interval <= 0:
            raise ValueError("poll and full_interval must be > 0")
        self.gate, self.poll, self.full_interval = gate, poll, full_interval
        self._last_full = time.monotonic()
        self.due_after = 10                # generation-1 collections; Python's own threshold, read at start
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        global _active, _saved
        with _state_lock:
            if _active == 0:
                _saved = gc.get_threshold()
                gc.set_threshold(_saved[0], _saved[1], _NEVER)
            self.due_after = _saved[2]          # Python's own, saved by the first collector to start
            _active += 1
        self._thread = threading.Thread(target=self._run, name="full-gc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; the last collector to stop gives Python its own schedule back, with every frozen
        object collectable again (so a process that starts and stops servers, as the tests do, leaks none)."""
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
                gc.unfreeze()

    def due(self) -> bool:
        return gc.get_count()[2] > self.due_after

    def collect_now(self, everything: bool = False) -> float:
        """One full collection under the gate, of what is not frozen (`everything`: of all, unfrozen first),
        its survivors frozen after; its seconds (the GIL-held part)."""
        with self.gate:
            started = time.perf_counter()
            if everything:
                gc.unfreeze()
                self._last_full = time.monotonic()
            try:
                gc.collect()
            finally:
                gc.freeze()
            return time.perf_counter() - started

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            if not self.due():
                continue
            try:
                self.collect_now(everything=time.monotonic() - self._last_full >= self.full_interval)
            except Exception:           # a finalizer that raises must not end the watch
                log.exception("garbage collection beside the step failed")
