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
        first = asyncio.ensure_future(slots.wait(refused, started, slots.generation, lambda: True))
        await asyncio.sleep(0.05)
        assert slots.waiting == 1
        with pytest.raises(Unavailable, match="device slots"):                     # the bound: no second waiter
            await slots.wait(refused, started, slots.generation, lambda: True)
        slots.changed()
        await asyncio.wait_for(first, 1)                                          # woken, to try again
        assert slots.waiting == 0
        with pytest.raises(Unavailable) as caught:                                # no release can help
            await slots.wait(refused, time.monotonic(), slots.generation, lambda: False)
        assert caught.value is refused
        quick = SlotWait(seconds=0.2, limit=4)
        t0 = time.monotonic()
        await quick.wait(refused, t0, quick.generation, lambda: True)              # the time runs out
        with pytest.raises(Unavailable, match=r"waited 0\.2 s for a device slot"):
            await quick.wait(refused, t0, quick.generation, lambda: True)
    asyncio.run(main())


def test_a_change_between_the_attempt_and_the_wait_is_not_lost():
    """A release between a request's refused attempt and its wait (the probe's 429 with free slots): the wait
    sees the generation moved and returns at once for another attempt, even if nothing is in use any more."""
    async def main():
        slots = SlotWait(seconds=5, limit=4)
        seen = slots.generation
        slots.changed()                                          # nobody waits yet: only the count moves
        t0 = time.monotonic()
        await slots.wait(Unavailable("full"), t0, seen, lambda: False)
        assert time.monotonic() - t0 < 0.1
    asyncio.run(main())


def test_deleting_or_deactivating_the_awaited_adapter_ends_the_wait(tmp_path):
    from _fixtures import make_registry, peft_adapter, run
    from service.registry import Conflict, NotFound

    async def main():
        registry = make_registry(tmp_path / "store", max_device_adapters=1, slot_wait_seconds=20)
        for i, name in enumerate(("held", "b", "c")):
            adapter = peft_adapter("lora", seed=i)
            await registry.register_files(name, adapter.config, adapter.weights)
        lease = await registry.acquire("held")
        for name, verb, error in (("b", registry.deactivate, Conflict), ("c", registry.delete, NotFound)):
            waiter = asyncio.ensure_future(registry.acquire(name, wait=True))
            for _ in range(100):                        # (its read happens first, in the loader thread)
                await asyncio.sleep(0.05)
                if registry._slots.waiting:
                    break
            assert not waiter.done() and registry._slots.waiting == 1
            t0 = time.monotonic()
            await verb(name)
            with pytest.raises(error):
                await asyncio.wait_for(waiter, 5)
            assert time.monotonic() - t0 < 2
        registry.release(lease)
    run(main())
