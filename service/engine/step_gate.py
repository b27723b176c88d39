"""`StepGate`: who may change the model's adapters while a step runs.

The engine thread holds the gate through each step, except while the step's C++ loop runs
(`direct_step.direct_decode`: every layer in one call, the GIL released), which reads only the kernels'
tables and the tensors of the adapters in the batch. Work that changes nothing that loop reads takes the gate
from another thread and so runs beside that loop rather than between two steps: the registry evicts adapters
no request uses this way (the eviction of a SmolLM2 adapter on q/v is ~0.6-2 ms of Python; with 1,000
adapters in rotation a step that admitted new requests waited for ~4 of them, ~20 ms of every such step). A
step that never reaches the loop holds the gate throughout, and the work waits for its end, as it did before.
Without an engine thread (tests, `Engine.generate`) the caller's thread steps and holds the gate the same way.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional


class StepGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: Optional[int] = None           # the thread id of the step holding it, if any

    @contextmanager
    def step(self) -> Iterator[None]:
        """Held by the stepping thread for one step."""
        with self._lock:
            self._holder = threading.get_ident()
            try:
                yield
            finally:
                self._holder = None

    @contextmanager
    def opened(self) -> Iterator[None]:
        """Inside a step, around a call that reads no Python object of the model (the GIL released): others
        may take the gate meanwhile. Outside a step, or in another thread than the step's, it does nothing."""
        if self._holder != threading.get_ident():
            yield
            return
        self._holder = None
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._holder = threading.get_ident()

    def __reduce__(self):
        """A copied or pickled model (tests deep-copy models) gets a gate of its own, unheld."""
        return StepGate, ()

    def __enter__(self) -> "StepGate":
        """Another thread's turn: waits for the step's C++ loop or its end (or takes it between steps)."""
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()
