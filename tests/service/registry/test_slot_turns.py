"""Turns for the device slots (`registry/turns.py`): an adapter whose requests never stop does not keep its slot
from a request that waited `adapter_turn_seconds` for one; the adapter with the fewest requests in flight yields,
never a pinned one; a yield ends when the request it was for gives up; with turns off the popular adapter keeps
its slot (the starvation the turns end)."""
import asyncio
import time

import pytest
from _fixtures import make_registry, peft_adapter, run

from service.registry import Unavailable

TURN = 0.3


class Yields:
    """The registry's events hook: the adapters that yielded, in order."""
    def __init__(self):
        self.names: list[str] = []

    def adapter_yielded(self, name: str) -> None:
        self.names.append(name)


async def registry_with(tmp_path, names, slots, turn=TURN, **kw):
    events = Yields()
    registry = make_registry(tmp_path / "store", max_device_adapters=slots, slot_wait_seconds=20,
                             slot_turn_seconds=turn, events=events, **kw)
    for i, name in enumerate(names):
        adapter = peft_adapter("lora", seed=i)
        await registry.register_files(name, adapter.config, adapter.weights)
    return registry, events


async def until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def keep_busy(registry, name, stop: asyncio.Event, served: list):
    """Steady traffic on `name`: a new request every 50 ms, each holding its lease 150 ms, so one is always in
    flight; how many got a lease goes to `served`, with the time it got it."""
    async def one():
        lease = await registry.acquire(name, wait=True)
        served.append(time.monotonic())
        await asyncio.sleep(0.15)
        registry.release(lease)
    tasks = []
    while not stop.is_set():
        tasks.append(asyncio.ensure_future(one()))
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks)


def test_an_adapter_in_constant_use_yields_its_slot_to_a_request_that_waited_its_turn(tmp_path):
    async def main():
        registry, events = await registry_with(tmp_path, ("popular", "rare"), slots=1)
        stop, served = asyncio.Event(), []
        traffic = asyncio.ensure_future(keep_busy(registry, "popular", stop, served))
        await until(lambda: len(served) >= 3)
        t0 = time.monotonic()
        rare = await asyncio.wait_for(registry.acquire("rare", wait=True), 10)
        waited = time.monotonic() - t0
        assert TURN <= waited < TURN + 2.0, waited          # its turn, then the popular adapter's drain (<= 150 ms)
        assert events.names == ["popular"]
        assert registry.get("rare").tier == "device" and registry.get("popular").tier != "device"
        during = len(served)
        await asyncio.sleep(0.3)
        assert len(served) == during                        # the popular adapter's requests wait their turn now
        registry.release(rare)
        await until(lambda: len(served) > during)           # and take the slot back at its release
        stop.set()
        await traffic
        assert registry.get("popular").yielding_to is None
    run(main())


def test_with_turns_off_a_popular_adapter_keeps_its_slot(tmp_path):
    """The starvation the turns end: the rare request waits while the popular adapter serves on."""
    async def main():
        registry, events = await registry_with(tmp_path, ("popular", "rare"), slots=1, turn=0)
        stop, served = asyncio.Event(), []
        traffic = asyncio.ensure_future(keep_busy(registry, "popular", stop, served))
        await until(lambda: len(served) >= 3)
        rare = asyncio.ensure_future(registry.acquire("rare", wait=True))
        await asyncio.sleep(1.5)
        assert not rare.done() and registry.get("popular").tier == "device"
        stop.set()
        await traffic
        registry.release(await asyncio.wait_for(rare, 5))    # in once the traffic stops
        assert events.names == []
    run(main())


def test_the_adapter_with_the_fewest_requests_in_flight_yields_never_a_pinned_one(tmp_path):
    async def main():
        registry, events = await registry_with(tmp_path, ("two", "one", "pinned", "rare"), slots=3)
        leases = [await registry.acquire(n) for n in ("pinned", "two", "two", "one")]   # (pinned: least recent)
        await registry.pin("pinned")
        rare = asyncio.ensure_future(registry.acquire("rare", wait=True))
        await until(lambda: events.names, seconds=TURN + 2)
        assert events.names == ["one"] and registry.get("one").yielding_to == "rare"
        assert registry.get("two").yielding_to is None and registry.get("pinned").yielding_to is None
        with pytest.raises(Unavailable, match="giving its device slot to adapter 'rare'"):
            await registry.acquire("one")                    # (a caller that cannot wait hears why)
        registry.release(leases[3])                          # "one" drains: "rare" takes its slot
        registry.release(await asyncio.wait_for(rare, 5))
        assert registry.get("one").tier != "device" and registry.get("two").tier == "device"
        for lease in leases[:3]:
            registry.release(lease)
    run(main())


def test_a_yield_ends_when_the_request_it_was_for_gives_up(tmp_path):
    async def main():
        registry, events = await registry_with(tmp_path, ("popular", "rare"), slots=1)
        held = await registry.acquire("popular")
        rare = asyncio.ensure_future(registry.acquire("rare", wait=True))
        await until(lambda: events.names, seconds=TURN + 2)
        later = asyncio.ensure_future(registry.acquire("popular", wait=True))
        await asyncio.sleep(0.2)
        assert not later.done()                              # behind the yield
        rare.cancel()                                        # its client went away
        lease = await asyncio.wait_for(later, 2)             # the yield ended: a lease with `held` still out
        assert registry.get("popular").yielding_to is None and registry.get("popular").in_use == 2
        for one in (held, lease):
            registry.release(one)
    run(main())
