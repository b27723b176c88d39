"""`SlotWait`: requests that wait for a device slot instead of being refused at once.

When every device slot (`max_device_adapters`, `adapter_memory_budget`) holds an adapter that requests are
using, a request for another adapter cannot load it now. vLLM's and LoRAX's schedulers keep such a request
waiting until a slot frees; so does this service: the request waits until some adapter's last request ends
(`released`), then tries again, for at most `seconds` (`ADAPTER_SERVE_ADAPTER_WAIT_SECONDS`), and at most
`limit` requests wait at once (`MAX_WAITING`); past either it is refused as before (429 with Retry-After). A
request waits only when a release can help: if no adapter on the device is in use (every slot pinned), it is
refused at once. Waiting requests hold no lease, so they cannot hold a slot another one waits for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from .errors import Unavailable


class SlotWait:
    def __init__(self, seconds: float, limit: int):
        self.seconds, self.limit = seconds, limit
        self.waiting = 0
        self._released = asyncio.Event()

    def released(self) -> None:
        """An adapter's last lease ended (event loop): wake every waiter to try again."""
        if self.waiting:
            self._released.set()
            self._released = asyncio.Event()

    async def wait(self, refused: Unavailable, started: float, helps: Callable[[], bool]) -> None:
        """Wait for the next release, or raise `refused` (with how long it waited) when waiting cannot help,
        too many already wait, or the time since `started` is up."""
        left = self.seconds - (time.monotonic() - started)
        if left <= 0 or self.waiting >= self.limit or not helps():
            waited = time.monotonic() - started
            if waited > 0.001:
                raise Unavailable(f"{refused} (waited {waited:.1f} s for a device slot)") from refused
            raise refused
        self.waiting += 1
        try:
            await asyncio.wait_for(self._released.wait(), left)
        except asyncio.TimeoutError:
            pass
        finally:
            self.waiting -= 1
