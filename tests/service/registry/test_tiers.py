"""Tiers: least-recently-used adapters move device -> cpu -> stored (the three tiers of a GPU server, asked
for with `single_memory=False`; on the CPU, where the two upper tiers are one memory, device -> stored and
no second copy is kept); pinned and in-use adapters never move; when every device slot is pinned or in use,
or the memory budget is full of them, the load fails with 503 naming the limit; the model holds exactly the
device-tier adapters; thousands registered, a few hot."""
import asyncio
import os
import random
import shutil
import sys

import pytest

from service.registry import Unavailable

from _fixtures import assert_same_model, fingerprint, make_registry, peft_adapter, run, Events

NAMES = ["a", "b", "c", "d", "e"]


async def _registry(tmp_path, names=NAMES, **kw):
    events = Events()
    registry = make_registry(tmp_path / "store", events=events, **kw)
    for i, name in enumerate(names):
        adapter = peft_adapter("lora" if i % 2 == 0 else "ia3", seed=i)
        await registry.register_files(name, adapter.config, adapter.weights)
    events.calls.clear()
    return registry, events


async def _use(registry, *names):
    for name in names:
        registry.release(await registry.acquire(name))
        await registry.drain()           # evictions leave the model at the next step boundary: wait for it


def tiers(registry):
    return {r.name: r.tier for r in registry.list()}


def in_model(registry):
    return sorted(n.rsplit("__", 1)[0] for n in getattr(registry.model, "peft_config", {}))


def test_lru_eviction_order_across_tiers(tmp_path):
    async def main():
        registry, events = await _registry(tmp_path, max_device_adapters=2, max_cpu_adapters=2, single_memory=False)
        # uploads land in the cpu tier; the two most recent stay, older ones are pushed to stored
        assert tiers(registry) == {"a": "stored", "b": "stored", "c": "stored", "d": "cpu", "e": "cpu"}
        await _use(registry, "a", "b")
        assert tiers(registry) == {"a": "device", "b": "device", "c": "stored", "d": "cpu", "e": "cpu"}
        assert in_model(registry) == ["a", "b"]
        await _use(registry, "a")                      # b is now the least recently used on the device
        events.calls.clear()
        await _use(registry, "c")
        assert tiers(registry)["b"] == "cpu" and tiers(registry)["a"] == "device"
        assert events.of("evicted") == [("b", "device"), ("d", "cpu")]   # b joins the cpu tier, d (oldest) leaves
        assert events.of("loaded") == [("c", "stored")]
        assert tiers(registry) == {"a": "device", "b": "cpu", "c": "device", "d": "stored", "e": "cpu"}
        await _use(registry, "e")                      # from cpu: evicts a (LRU), then e leaves cpu
        assert tiers(registry) == {"a": "cpu", "b": "cpu", "c": "device", "d": "stored", "e": "device"}
        assert in_model(registry) == ["c", "e"]
        assert registry.tier_counts() == {"stored": 1, "cpu": 2, "device": 2}
        assert {r.name: r.requests_served for r in registry.list()} == {"a": 2, "b": 1, "c": 1, "d": 0, "e": 1}
        assert registry.get("b").tensors is not None and registry.get("d").tensors is None

    run(main())


def test_pinned_and_in_use_adapters_are_never_evicted(tmp_path):
    async def main():
        registry, events = await _registry(tmp_path, max_device_adapters=3, max_cpu_adapters=1)
        await _use(registry, "a")
        await registry.pin("a")
        held = await registry.acquire("b")             # in use for the whole cycle
        for name in ["c", "d", "e", "c", "d", "e"]:    # only the third slot turns over
            await _use(registry, name)
            assert tiers(registry)["a"] == "device" and tiers(registry)["b"] == "device"
            assert in_model(registry) == sorted(["a", "b", name])
        assert [n for n, tier in events.of("evicted") if tier == "device"] == ["c", "d", "e", "c", "d"]
        assert registry.get("b").in_use == 1
        registry.release(held)
        registry.release(held)                         # idempotent
        assert registry.get("b").in_use == 0
        await _use(registry, "c")                      # b is free now and least recently used
        assert tiers(registry)["b"] != "device" and tiers(registry)["a"] == "device"
        await registry.pin("a", False)
        await _use(registry, "d", "e")
        assert tiers(registry)["a"] != "device"        # unpinned: evicted like the others

    run(main())


def test_pinned_adapter_stays_in_the_cpu_tier(tmp_path):
    async def main():
        registry, events = await _registry(tmp_path, max_device_adapters=1, max_cpu_adapters=1,
                                           single_memory=False)
        assert tiers(registry)["e"] == "cpu"
        await registry.pin("e")
        await _use(registry, "a", "b", "c")             # each one evicted from the device passes through cpu
        assert tiers(registry)["e"] == "cpu" and registry.get("e").tensors is not None
        assert registry.tier_counts() == {"stored": 3, "cpu": 1, "device": 1}
        assert events.of("evicted") == [("a", "device"), ("a", "cpu"), ("b", "device"), ("b", "cpu")]
        await registry.pin("e", False)
        await _use(registry, "d")                      # c comes down to cpu; now e is the LRU there
        assert tiers(registry) == {"a": "stored", "b": "stored", "c": "cpu", "d": "device", "e": "stored"}

    run(main())


def test_all_slots_pinned_or_in_use_is_503(tmp_path):
    async def main():
        registry, events = await _registry(tmp_path, max_device_adapters=2, single_memory=False)
        await _use(registry, "a")
        await registry.pin("a")
        held = await registry.acquire("b")
        before = fingerprint(registry.model)
        with pytest.raises(Unavailable) as err:
            await registry.acquire("c")
        assert err.value.status == 503
        assert "max_device_adapters=2" in str(err.value) and "'c'" in str(err.value)
        assert_same_model(before, registry.model)
        assert registry.get("c").in_use == 0 and tiers(registry)["c"] == "cpu"
        assert events.of("load_failed") == []          # no room is a turn to wait for, not a failed load
        registry.release(held)                         # a slot is free again
        await _use(registry, "c")
        assert tiers(registry) == {"a": "device", "b": "cpu", "c": "device", "d": "cpu", "e": "cpu"}

    run(main())


@pytest.mark.parametrize("concurrency", [3, 50])
def test_concurrent_acquires_respect_the_limits(tmp_path, concurrency):
    """Many concurrent requests over more adapters than device slots: an adapter in use is never evicted,
    the device tier never exceeds its limit, the model holds exactly the device-tier adapters, and with at
    most max_device_adapters requests at once nothing is refused."""
    names = [f"n{i}" for i in range(8)]

    async def main():
        registry, _ = await _registry(tmp_path, names=names, max_device_adapters=3, max_cpu_adapters=2)
        rng = random.Random(0)
        gate = asyncio.Semaphore(concurrency)
        served, refused = 0, 0

        async def request(name):
            nonlocal served, refused
            async with gate:
                try:
                    lease = await registry.acquire(name)
                except Unavailable:
                    refused += 1
                    return
                assert lease.model_name in registry.model.peft_config
                assert registry.tier_counts()["device"] <= 3
                await asyncio.sleep(rng.random() * 0.002)
                assert registry.get(name).tier == "device"      # never evicted while in use
                assert lease.model_name in registry.model.peft_config
                registry.release(lease)
                served += 1

        await asyncio.gather(*(request(rng.choice(names)) for _ in range(200)))
        await registry.drain()
        assert served + refused == 200 and served > 0
        if concurrency <= 3:
            assert refused == 0
        assert all(r.in_use == 0 for r in registry.list())
        assert sorted(r.name for r in registry.list() if r.tier == "device") == in_model(registry)
        assert registry.tier_counts()["device"] <= 3 and registry.tier_counts()["cpu"] <= 2
        assert sum(r.requests_served for r in registry.list()) == served

    run(main())


def test_thousand_registered_few_hot(tmp_path):
    adapter = peft_adapter("ia3")
    names = [f"user-{i:04d}" for i in range(1000)]

    async def main():
        first = make_registry(tmp_path / "store")
        await first.register_files(names[0], adapter.config, adapter.weights)
        # copies of a registered folder, as a previous run would have left them: scanning is the fast way to 1000
        for name in names[1:]:
            shutil.copytree(tmp_path / "store" / names[0], tmp_path / "store" / name)
        registry = make_registry(tmp_path / "store", max_device_adapters=4, max_cpu_adapters=8, single_memory=False)
        await registry.scan()
        assert registry.tier_counts() == {"stored": 1000, "cpu": 0, "device": 0}
        rng = random.Random(1)
        for name in rng.sample(names, 30):
            await _use(registry, name)
        counts = registry.tier_counts()
        assert counts == {"stored": 1000 - 12, "cpu": 8, "device": 4}
        assert len(registry.model.peft_config) == 4
        assert len({r.sha256 for r in registry.list()}) == 1

    run(main())


def test_cpu_serving_keeps_one_copy_and_evicts_to_the_store(tmp_path):
    """On the CPU (the default there): an adapter in the model is held once (the record keeps no tensors, the
    stacks read the loaded parameters), and eviction from the device sends it back to the store."""
    async def main():
        registry, events = await _registry(tmp_path, max_device_adapters=2)
        assert registry.single_memory
        await _use(registry, "a", "c")
        assert registry.get("a").tensors is None and registry.get("c").tensors is None
        events.calls.clear()
        await _use(registry, "e")                      # a (LRU) leaves the model for the store
        assert tiers(registry)["a"] == "stored" and in_model(registry) == ["c", "e"]
        assert events.of("evicted") == [("a", "device")]
        await _use(registry, "a")                      # and loads again from it
        assert in_model(registry) == ["a", "e"]

    run(main())


def test_memory_budget_limits_the_device_tier(tmp_path):
    """`memory_budget` (bytes of stored weights) evicts like the count limit, and a budget full of adapters in
    use refuses with 503 naming it."""
    async def main():
        registry, events = await _registry(tmp_path, names=["a", "c", "e"])
        budget = registry.get("c").size + registry.get("e").size             # room for two of the three
        registry.memory_budget = budget
        await _use(registry, "a", "c", "e")
        assert in_model(registry) == ["c", "e"] and tiers(registry)["a"] == "stored"
        held = [await registry.acquire("c"), await registry.acquire("e")]
        with pytest.raises(Unavailable) as err:
            await registry.acquire("a")
        assert f"adapter_memory_budget={budget}" in str(err.value)
        for lease in held:
            registry.release(lease)
        await _use(registry, "a")
        assert registry.tier_bytes()["device"] <= budget

    run(main())


def test_load_and_evict_move_one_adapter_without_touching_the_store(tmp_path):
    """The replica-local verbs Ray Serve's multiplexed loader uses: `load` brings an adapter to the device tier
    without a lease, `evict` takes it out as LRU eviction would; neither writes the store (other replicas keep
    serving it), a pinned or in-use adapter stays, and a deactivated one is refused."""
    from service.registry import Conflict, NotFound

    async def main():
        registry, events = await _registry(tmp_path, names=["a", "b"], max_device_adapters=2)
        meta = (tmp_path / "store" / "a" / "registry.json").read_bytes()
        assert (await registry.load("a")).tier == "device" and in_model(registry) == ["a"]
        assert registry.get("a").in_use == 0 and [name for name, _ in events.of("loaded")] == ["a"]
        assert await registry.evict("a") is True
        assert tiers(registry)["a"] != "device" and in_model(registry) == []
        assert events.of("evicted") == [("a", "device")]
        assert await registry.evict("a") is False                     # not on the device: nothing to do
        lease = await registry.acquire("b")
        assert await registry.evict("b") is False and tiers(registry)["b"] == "device"   # in use: stays
        registry.release(lease)
        await registry.pin("b")
        assert await registry.evict("b") is False and tiers(registry)["b"] == "device"   # pinned: stays
        await registry.deactivate("a")
        with pytest.raises(Conflict, match="deactivated"):
            await registry.load("a")
        with pytest.raises(NotFound):
            await registry.load("nope")
        with pytest.raises(NotFound):
            await registry.evict("nope")
        await registry.activate("a")
        assert (tmp_path / "store" / "a" / "registry.json").read_bytes() == meta   # load / evict wrote nothing

    run(main())


@pytest.mark.skipif(not hasattr(os, "getpriority") or sys.platform != "linux", reason="per-thread nice is Linux's")
@pytest.mark.parametrize("nice", [0, 10])
def test_loader_and_evictor_threads_run_at_loader_nice(tmp_path, nice):
    """`loader_nice` is added to the threads' nice value (Linux: per thread); the caller's stays."""
    from service.engine.step_gate import StepGate

    registry = make_registry(tmp_path / "store", step_gate=StepGate(), loader_nice=nice)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    for pool in (registry._loader, registry._evictor):
        assert pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result() == min(19, own + nice)
    assert os.getpriority(os.PRIO_PROCESS, 0) == own                    # the calling thread keeps its own


def test_the_heap_is_trimmed_every_trim_every_reads(tmp_path, monkeypatch):
    """Stored adapters read by the loader trim the C heap once per `TRIM_EVERY` reads, not after each one
    (between trims a load reuses the pages evictions freed)."""
    from service.registry import reads as reads_module

    trims = []
    monkeypatch.setattr(reads_module, "trim_heap", lambda: trims.append(True))
    monkeypatch.setattr(reads_module, "TRIM_EVERY", 3)

    async def main():
        registry, _ = await _registry(tmp_path, max_device_adapters=1)
        for round_ in range(2):
            await _use(registry, *NAMES)       # one device slot: adapters leave it and are read again
        assert registry._loads_read >= len(NAMES)
        assert len(trims) == registry._loads_read // 3
        await registry.drain()

    run(main())


def test_close_ends_the_loader_and_evictor_threads(tmp_path):
    from service.engine.step_gate import StepGate

    async def main():
        registry, _ = await _registry(tmp_path, step_gate=StepGate(), max_device_adapters=1)
        await _use(registry, "a", "c", "a")           # loads, and evictions on the evictor thread
        threads = set(registry._loader._threads) | set(registry._evictor._threads)
        assert threads and all(t.is_alive() for t in threads)
        await registry.drain()
        registry.close()
        assert not any(t.is_alive() for t in threads)
        with pytest.raises(RuntimeError):
            await registry.acquire("c")              # (evicted: a load after close fails)

    run(main())
