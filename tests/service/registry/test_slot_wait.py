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
        assert time.monotonic() - t0 < 1.0                       # not the 5 s wait
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


def test_a_wait_for_a_slot_is_no_failed_load_and_its_adapter_shows_as_waiting(tmp_path):
    """The probe's alert noise: each refused attempt of a waiting request counted as a failed load (2,376 in a
    minute of churn); and the gateway's `waiting_lora_adapters` was empty while requests waited for a slot."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from _fixtures import make_registry, peft_adapter, run
    from service.metrics import Metrics

    def families():
        return {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}

    metrics = Metrics()

    async def main():
        registry = make_registry(tmp_path / "store", max_device_adapters=1, slot_wait_seconds=20, events=metrics)
        metrics.watch_adapters(registry.max_device_adapters, registry.list)
        metrics.watch_slot_waiters(lambda: registry.slot_waiters, registry.slot_waiting_adapters)
        for i, name in enumerate(("held", "b")):
            adapter = peft_adapter("lora", seed=i)
            await registry.register_files(name, adapter.config, adapter.weights)
        lease = await registry.acquire("held")
        waiter = asyncio.ensure_future(registry.acquire("b", wait=True))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if registry._slots.waiting:
                break
        assert registry.slot_waiting_adapters() == ["b"]
        (info,) = families()["vllm:lora_requests_info"].samples
        assert info.labels["running_lora_adapters"] == "held" and info.labels["waiting_lora_adapters"] == "b"
        registry.release(lease)
        registry.release(await asyncio.wait_for(waiter, 5))
        assert registry.slot_waiting_adapters() == []
        (info,) = families()["vllm:lora_requests_info"].samples
        assert info.labels["running_lora_adapters"] == "b" and info.labels["waiting_lora_adapters"] == ""
        assert families()["adapter_serve_adapter_load_failures"].samples[0].value == 0
    run(main())


def test_activate_with_every_slot_held_activates_and_a_failed_load_undoes_it(tmp_path):
    """A 503 that had already activated the adapter (kept in the store): now the activation stands with a 200
    (its first request loads it, waiting for a slot); a load that fails for another reason leaves it inactive."""
    from _fixtures import Events, make_registry, peft_adapter, run
    from service.registry import STORED

    events = Events()

    async def reopened(name):
        again = make_registry(tmp_path / "store")
        await again.scan()
        return again.get(name).served

    async def main():
        registry = make_registry(tmp_path / "store", max_device_adapters=1, slot_wait_seconds=20, events=events)
        for i, name in enumerate(("held", "b", "broken")):
            adapter = peft_adapter("lora", seed=i)
            await registry.register_files(name, adapter.config, adapter.weights)
        lease = await registry.acquire("held")
        await registry.deactivate("b")
        record = await registry.activate("b")                   # no slot: activated, still stored
        assert record.served and record.tier == STORED
        assert await reopened("b")                                      # what the store says
        registry.release(lease)
        registry.release(await registry.acquire("b", wait=True))
        await registry.deactivate("broken")
        for path in (tmp_path / "store" / "broken").glob("*.safetensors"):
            path.write_bytes(b"not a safetensors file")
        with pytest.raises(Exception):
            await registry.activate("broken")
        assert not registry.get("broken").served and not await reopened("broken")
        assert events.of("load_failed") == [("broken",)]        # the one real failure, not the wait for a slot
    run(main())


def test_a_request_waiting_for_a_slot_reads_its_adapter_only_when_it_can_have_one(tmp_path):
    """Every release wakes the requests waiting for a slot to try again; under slot pressure (16 slots, Zipf traffic
    over 128 adapters) each refused attempt read and prepared its adapter before finding no room. Now an attempt
    that would find none is refused before the read."""
    from _fixtures import make_registry, peft_adapter, run

    async def main():
        registry = make_registry(tmp_path / "store", max_device_adapters=1, slot_wait_seconds=20)
        for i, name in enumerate(("held", "b")):
            adapter = peft_adapter("lora", seed=i)
            await registry.register_files(name, adapter.config, adapter.weights)
        lease = await registry.acquire("held")
        reads = []
        for spied in ("_read_for_load", "_prepare_load"):          # (a stored adapter; one kept in RAM)
            def spy(*args, _real=getattr(registry, spied), _name=spied, **kwargs):
                reads.append(_name)
                return _real(*args, **kwargs)
            setattr(registry, spied, spy)
        waiter = asyncio.ensure_future(registry.acquire("b", wait=True))
        for _ in range(5):                                          # five wake-ups with no slot to have
            for _ in range(100):
                await asyncio.sleep(0.02)
                if registry._slots.waiting:
                    break
            assert registry._slots.waiting == 1
            registry._slots.changed()
        await asyncio.sleep(0.1)
        assert reads == [] and not waiter.done()
        registry.release(lease)
        registry.release(await asyncio.wait_for(waiter, 5))
        assert len(reads) == 1 and registry.get("b").tier == "device"
    run(main())
