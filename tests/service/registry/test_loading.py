"""Loads off the serving path: an adapter is read, checked and prepared in a worker thread and the registry's
lock is not held while the engine applies it, so loads of different adapters overlap (on a GPU server
their engine calls share one step boundary; on the CPU a prepared adapter is attached at once, beside the
running step, without waiting for a boundary at all), and a second request for an adapter being loaded
waits for that load instead of starting another; after the first adapter has wrapped its layers, only
what the worker prepared is attached. The served adapters are PEFT's either way (decoder_logits)."""
import asyncio
import concurrent.futures
import threading
import time

from service.registry import tiers

import pytest
import torch

import adapters_core as ac

from _fixtures import Events, decoder_logits, hf_logits, input_ids, make_registry, no_wrapping_ahead, peft_adapter, run

STEP = 0.3          # seconds an engine "step" takes before the calls queued meanwhile run, all together


class SteppingEngine:
    """`Engine.call_between_steps` of a busy engine: calls queue and run together at the next boundary."""

    def __init__(self):
        self.queue, self.lock, self.boundaries = [], threading.Lock(), 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def __call__(self, fn):
        future = concurrent.futures.Future()
        with self.lock:
            self.queue.append((fn, future))
        return future

    def _loop(self):
        while not self.stop.wait(STEP):
            with self.lock:
                calls, self.queue = self.queue, []
            if calls:
                self.boundaries += 1
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)


def _count_full_loads(monkeypatch) -> list[str]:
    """The model names the general path (`tiers._inject`, on the engine thread) loads, as they come."""
    full_loads, inject = [], tiers._inject
    monkeypatch.setattr(tiers, "_inject", lambda *args: full_loads.append(args[1]) or inject(*args))
    return full_loads


async def _registered(tmp_path, engine, adapters: dict, single_memory: bool):
    registry = make_registry(tmp_path / "store", engine_call=engine, max_device_adapters=8,
                             single_memory=single_memory)
    for name, adapter in adapters.items():
        await registry.register_files(name, adapter.config, adapter.weights)
    return registry


def _run_stepping(engine: SteppingEngine, main) -> None:
    try:
        run(main())
    finally:
        engine.stop.set()


def _assert_peft(registry, leases, adapters: dict) -> None:
    """Each lease's adapter computes what PEFT computes with it."""
    ids = input_ids()
    for lease in leases:
        torch.testing.assert_close(decoder_logits(registry.model, lease.model_name, ids),
                                   hf_logits(adapters[lease.name].model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("single_memory", [False, True])
def test_a_cold_burst_wraps_the_layers_once(tmp_path, monkeypatch, single_memory):
    """Several adapters asked for at once while their layers are not wrapped: the first load wraps them on the
    engine thread, and the others, read meanwhile, wait for it and are prepared and attached instead of each
    taking the engine's general path (one step boundary each) behind it."""
    adapters = {name: peft_adapter("lora", seed=i) for i, name in enumerate(["a", "b", "c", "d"])}
    no_wrapping_ahead(monkeypatch)
    engine, full_loads = SteppingEngine(), _count_full_loads(monkeypatch)

    async def main():
        registry = await _registered(tmp_path, engine, adapters, single_memory)
        leases = await asyncio.gather(*(registry.acquire(n) for n in adapters))
        assert len(full_loads) == 1, f"{len(full_loads)} loads took the general path: {full_loads}"
        assert not registry._engine_loads
        _assert_peft(registry, leases, adapters)
        for lease in leases:
            registry.release(lease)

    _run_stepping(engine, main)


@pytest.mark.parametrize("single_memory", [False, True])
def test_loads_of_different_adapters_overlap(tmp_path, monkeypatch, single_memory):
    adapters = {name: peft_adapter("lora", seed=i) for i, name in enumerate(["w", "a", "b", "c"])}
    no_wrapping_ahead(monkeypatch)
    engine, full_loads = SteppingEngine(), _count_full_loads(monkeypatch)

    async def main():
        registry = await _registered(tmp_path, engine, adapters, single_memory)
        registry.release(await registry.acquire("w"))          # wraps the layers: the general path
        assert [n.rsplit("__", 1)[0] for n in full_loads] == ["w"]
        before, started = engine.boundaries, time.monotonic()
        leases = await asyncio.gather(*(registry.acquire(n) for n in ["a", "b", "c", "a", "b"]))
        elapsed = time.monotonic() - started
        if single_memory:
            assert engine.boundaries == before and elapsed < STEP, "a prepared load waited for the engine"
        else:
            assert engine.boundaries - before == 1, "three loads took more than one step boundary"
            assert elapsed < 2.5 * STEP
        assert [n.rsplit("__", 1)[0] for n in full_loads] == ["w"]           # a, b, c were attached
        assert [lease.model_name for lease in leases[3:]] == [lease.model_name for lease in leases[:2]]
        assert len(registry.model.peft_config) == 4
        _assert_peft(registry, leases[:3], adapters)
        for lease in leases:
            registry.release(lease)

    _run_stepping(engine, main)


@pytest.mark.parametrize("single_memory", [False, True])
def test_layers_wrapped_ahead_make_a_first_burst_prepared(tmp_path, monkeypatch, single_memory):
    """The registry wraps the layers its adapters target as they are registered, and as a server starts over
    a store (its scan): a start's burst of first loads then takes no general load, and on the CPU no step
    boundary at all; the served adapters are PEFT's."""
    adapters = {name: peft_adapter("lora", seed=i) for i, name in enumerate(["a", "b", "c", "d"])}
    engine, full_loads = SteppingEngine(), _count_full_loads(monkeypatch)

    async def main():
        first = await _registered(tmp_path, engine, adapters, single_memory)
        assert any(type(m) is ac.AdapterLayer for m in first.model.modules())       # wrapped at registration
        first.close()
        registry = make_registry(tmp_path / "store", engine_call=engine, max_device_adapters=8,
                                 single_memory=single_memory)                       # a restart: a fresh model
        assert not any(type(m) is ac.AdapterLayer for m in registry.model.modules())
        await registry.scan()
        before = engine.boundaries
        leases = await asyncio.gather(*(registry.acquire(n) for n in adapters))
        assert full_loads == [], f"loads took the general path: {full_loads}"
        if single_memory:
            assert engine.boundaries == before, "a prepared load waited for the engine"
        else:                       # one shared boundary, two if the reads straddle one: never one per load
            assert engine.boundaries - before <= 2
        _assert_peft(registry, leases, adapters)
        for lease in leases:
            registry.release(lease)

    _run_stepping(engine, main)


def test_a_rescan_wraps_the_layers_of_adapters_it_finds(tmp_path, monkeypatch):
    """Adapters another process put in the store (found by `rescan`) get their layers wrapped too: their first
    load is prepared."""
    full_loads = _count_full_loads(monkeypatch)

    async def main():
        registry = make_registry(tmp_path / "store", max_device_adapters=8)
        await registry.scan()                                   # an empty store: nothing to wrap
        assert not any(type(m) is ac.AdapterLayer for m in registry.model.modules())
        writer = make_registry(tmp_path / "store", max_device_adapters=8)
        adapter = peft_adapter("lora", seed=3)
        await writer.register_files("a", adapter.config, adapter.weights)
        writer.close()
        assert (await registry.rescan())["added"] == ["a"]
        assert any(type(m) is ac.AdapterLayer for m in registry.model.modules())
        lease = await registry.acquire("a")
        assert full_loads == [], f"loads took the general path: {full_loads}"
        _assert_peft(registry, [lease], {"a": adapter})
        registry.release(lease)

    run(main())


async def _restarted_with_one_adapter(tmp_path):
    """(a registry started over a store holding adapter "a", its recorded events): the next acquire reads it."""
    lora = peft_adapter("lora")
    first = make_registry(tmp_path / "store")
    await first.register_files("a", lora.config, lora.weights)
    await first.drain()
    events = Events()
    registry = make_registry(tmp_path / "store", events=events)
    await registry.scan()
    return registry, events


def test_a_load_reports_its_wait_for_the_loader_and_the_loaders_time(tmp_path):
    """`adapter_read`: how long a load waited for the loader thread (here held by other work for 0.2 s) and how
    long the thread then took (the wait counted from the load's hand-over, a moment after its request); both inside
    the load's whole time (`adapter_loaded`)."""
    async def main():
        registry, events = await _restarted_with_one_adapter(tmp_path)
        gate = threading.Event()
        registry._loader.submit(gate.wait)                      # the loads before it
        loading = asyncio.ensure_future(registry.acquire("a"))
        await asyncio.sleep(0.2)
        assert not loading.done() and events.reads == []
        gate.set()
        registry.release(await loading)
        ((name, queued, seconds, resumed),) = events.reads
        (whole,) = events.load_seconds["a"]
        assert name == "a" and queued >= 0.15 and 0 < seconds < whole - queued + 1e-6
        assert 0 <= resumed < whole - queued - seconds + 1e-6
        await registry.drain()

    run(main())


def test_a_load_reports_its_wait_for_the_event_loop_after_the_read(tmp_path):
    """`adapter_read`'s last part: how long the finished read waited for the event loop to take it back (here the
    loop is inside a 0.2 s callback when the read ends, as a loop busy with a request's intake would be; the
    result goes ahead of callbacks still queued, `service.loop_first`, not of one running); inside the load's
    whole time."""
    async def main():
        registry, events = await _restarted_with_one_adapter(tmp_path)
        loop, read, holding = asyncio.get_running_loop(), registry._read_stored, threading.Event()

        def hold():
            holding.set()
            time.sleep(0.2)

        def read_then_hold_the_loop(*args):
            out = read(*args)
            loop.call_soon_threadsafe(hold)
            assert holding.wait(5)                            # the loop is in that callback as the read ends
            return out
        registry._read_stored = read_then_hold_the_loop
        registry.release(await registry.acquire("a"))
        ((name, queued, seconds, resumed),) = events.reads
        (whole,) = events.load_seconds["a"]
        assert name == "a" and seconds < 0.2 and 0.15 <= resumed <= whole - queued - seconds + 1e-6
        await registry.drain()

    run(main())
