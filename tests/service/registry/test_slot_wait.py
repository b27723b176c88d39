"""`SlotWait`: a request waits for the next release and tries again; it is refused at once when no release can
help or too many already wait, and after its time is up (with how long it waited)."""
import asyncio
import time

import pytest

from service.registry import Unavailable
from service.registry.slot_wait import SlotWait


def test_waiters_wake_on_a_release_and_are_bounded():
    async def main():
        slots = SlotWait(seconds=5, limit=1)
        refused = Unavailable("all 2 device slots hold in-use adapters")
        started = time.monotonic()
        first = asyncio.ensure_future(slots.wait(refused, started, lambda: True))
        await asyncio.sleep(0.05)
        assert slots.waiting == 1
        with pytest.raises(Unavailable, match="device slots"):                     # the bound: no second waiter
            await slots.wait(refused, started, lambda: True)
        slots.released()
        await asyncio.wait_for(first, 1)                                          # woken, to try again
        assert slots.waiting == 0
        with pytest.raises(Unavailable) as caught:                                # no release can help
            await slots.wait(refused, time.monotonic(), lambda: False)
        assert caught.value is refused
        quick = SlotWait(seconds=0.2, limit=4)
        t0 = time.monotonic()
        await quick.wait(refused, t0, lambda: True)                               # the time runs out
        with pytest.raises(Unavailable, match=r"waited 0\.2 s for a device slot"):
            await quick.wait(refused, t0, lambda: True)
    asyncio.run(main())
