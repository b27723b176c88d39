"""`SlotWait`: requests that wait for a device slot instead of being refused at once.

When every device slot (`max_device_adapters`, `adapter_memory_budget`) holds an adapter that requests are
using, a request for another adapter cannot load it now. vLLM's and LoRAX's schedulers keep such a request
waiting until a slot frees; so does this service: the request waits until something changes that may let it
in (`changed`: an adapter's last request ended, an eviction finished, an adapter was deleted or deactivated),
then tries again, for at most `seconds` (`ADAPTER_SERVE_ADAPTER_WAIT_SECONDS`), and at most `limit` requests wait
at once (`MAX_WAITING`); past either it is refused as before (429 with Retry-After). A change between a
request's attempt and its wait is never lost (`generation`: the attempt notes it, the wait retries at once if it
moved). A request waits only when a change can help (an adapter on the device in use and not pinned, or one
leaving the model); else it is refused at once. Waiting requests hold no lease, so they cannot hold a slot
another one waits for; a client that goes away while its request waits cancels the wait. A request that has waited
`turn` seconds (`ADAPTER_SERVE_ADAPTER_TURN_SECONDS`) makes an adapter on the device yield its slot (turns.py).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Callable

from .errors import Unavailable


class SlotWait:
    def __init__(self, seconds: float, limit: int, on_names: Callable[[], None] = lambda: None, turn: float = 0.0,
                 on_turn: Callable[[], None] = lambda: None):
        """`on_names` is called when the set of adapters that requests wait for changes (metrics); `on_turn` when
        a request starts or stops waiting, and when one has waited `turn` seconds (turns.py; 0: never)."""
        self.seconds, self.limit, self.turn = seconds, limit, turn
        self._started: dict[object, tuple[str, float]] = {}    # each waiting request: (its adapter, when it began)
        self.waiting = 0
        self.names: collections.Counter[str] = collections.Counter()     # adapter -> requests waiting for it
        self.generation = 0                 # moves with every change a waiting request may be waiting for
        self._changed = asyncio.Event()
        self._on_names, self._on_turn = on_names, on_turn

    def overdue(self) -> set[str]:
        """The adapters that requests have waited `turn` seconds or more for."""
        now = time.monotonic()
        return {name for name, started in self._started.values() if now - started >= self.turn}

    def changed(self) -> None:
        """Something that may let a waiting request in happened (event loop): wake every waiter to try again."""
        self.generation += 1
        if self.waiting:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait(self, refused: Unavailable, started: float, seen: int, helps: Callable[[], bool],
                   name: str = "") -> None:
        """Return when the request should try again (at once if anything changed since `seen`, the generation
        its attempt began in); raise `refused` (with how long it waited) when waiting cannot help, too many
        already wait, or the time since `started` is up. `name`: the adapter it waits for (`names`)."""
        if self.generation != seen:
            return
        left = self.seconds - (time.monotonic() - started)
        if left <= 0 or self.waiting >= self.limit or not helps():
            waited = time.monotonic() - started
            if waited > 0.001:
                raise Unavailable(f"{refused} (waited {waited:.1f} s for a device slot)") from refused
            raise refused
        self.waiting += 1
        self.names[name] += 1
        if self.names[name] == 1:
            self._on_names()
        token = object()
        self._started[token] = (name, started)
        self._on_turn()
        changed = self._changed
        try:
            due = started + self.turn - time.monotonic()
            if self.turn and 0 < due < left:
                try:
                    await asyncio.wait_for(changed.wait(), due)
                    return
                except asyncio.TimeoutError:
                    self._on_turn()         # waited its turn: an adapter on the device yields to it
            await asyncio.wait_for(changed.wait(), max(0.0, started + self.seconds - time.monotonic()))
        except asyncio.TimeoutError:
            pass
        finally:
            del self._started[token]
            self._on_turn()
            self.waiting -= 1
            self.names[name] -= 1
            if not self.names[name]:
                del self.names[name]
                self._on_names()
