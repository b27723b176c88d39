"""Leases against deletes, replacements and deactivation: a name disappears (or changes) at once for new
requests, running requests keep their adapter until they release it, and then its memory really goes."""
import asyncio
import concurrent.futures
import gc
import json
import threading
import time
import weakref

import pytest
import torch

from service.registry import Conflict, NotFound

from _fixtures import (decoder_logits, hf_logits, input_ids, make_registry, no_wrapping_ahead, peft_adapter, run,
                       store_files, Events)


def _adapter_param(model, model_name):
    return next(p for n, p in model.named_parameters() if f".{model_name}." in n or n.endswith(f".{model_name}"))


def test_delete_while_leased_refuses_at_once_and_frees_after_release(tmp_path):
    adapter = peft_adapter("lora")
    ids = input_ids()
    events = Events()

    async def main():
        registry = make_registry(tmp_path / "store", events=events)
        await registry.register_files("a", adapter.config, adapter.weights)
        lease = await registry.acquire("a")
        model = registry.model
        param_ref = weakref.ref(_adapter_param(model, lease.model_name))
        assert registry.get("a").tensors is None          # on the CPU the model holds the only copy
        before = decoder_logits(model, lease.model_name, ids)

        await registry.delete("a")
        with pytest.raises(NotFound):
            registry.get("a")
        with pytest.raises(NotFound) as err:
            await registry.acquire("a")
        assert err.value.status == 404
        assert registry.list() == [] and store_files(tmp_path / "store") == []
        # the running request still has its adapter, unchanged
        assert lease.model_name in model.peft_config
        torch.testing.assert_close(decoder_logits(model, lease.model_name, ids), before, atol=0, rtol=0)
        assert registry.tier_counts()["device"] == 1

        registry.release(lease)
        await registry.drain()
        assert lease.model_name not in model.peft_config
        assert registry.tier_counts() == {"stored": 0, "cpu": 0, "device": 0}
        gc.collect()
        assert param_ref() is None
        with pytest.raises(NotFound):
            await registry.delete("a")

    run(main())
    assert events.of("deleted") == [("a",)]


def test_delete_unused_frees_at_once(tmp_path):
    adapter = peft_adapter("ia3")

    async def main():
        registry = make_registry(tmp_path / "store")
        await registry.register_files("a", adapter.config, adapter.weights)
        registry.release(await registry.acquire("a"))
        await registry.delete("a")
        assert not registry.model.peft_config
        assert registry.tier_counts() == {"stored": 0, "cpu": 0, "device": 0}

    run(main())


@pytest.mark.parametrize("how", ["delete", "replace"])
def test_reregister_same_name_while_old_lease_alive(tmp_path, how):
    first, second = peft_adapter("lora", seed=0), peft_adapter("lora", seed=1)
    ids = input_ids()

    async def main():
        registry = make_registry(tmp_path / "store")
        await registry.register_files("a", first.config, first.weights)
        old = await registry.acquire("a")
        if how == "delete":
            await registry.delete("a")
            await registry.register_files("a", second.config, second.weights)
        else:
            await registry.register_files("a", second.config, second.weights, replace=True)
        new = await registry.acquire("a")
        model = registry.model
        assert new.model_name != old.model_name
        assert {old.model_name, new.model_name} <= set(model.peft_config)
        torch.testing.assert_close(decoder_logits(model, old.model_name, ids), hf_logits(first.model, ids),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(decoder_logits(model, new.model_name, ids), hf_logits(second.model, ids),
                                   atol=1e-4, rtol=0)
        registry.release(old)
        await registry.drain()
        assert set(model.peft_config) == {new.model_name}
        assert registry.get("a").in_use == 1 and registry.get("a").tier == "device"
        registry.release(new)
        return registry

    registry = run(main())
    meta = json.loads((tmp_path / "store" / "a" / "registry.json").read_text())
    assert meta["sha256"] == registry.get("a").sha256
    assert store_files(tmp_path / "store") == ["a", "a/adapter_config.json", "a/adapter_model.safetensors",
                                               "a/registry.json"]


def test_deactivate_and_activate(tmp_path):
    adapter = peft_adapter("adalora")
    events = Events()

    async def main():
        registry = make_registry(tmp_path / "store", events=events)
        await registry.register_files("a", adapter.config, adapter.weights)
        registry.release(await registry.acquire("a"))
        record = await registry.deactivate("a")
        assert not record.served and record.tier == "stored" and not registry.model.peft_config
        assert registry.get("a") is record                     # still registered and listed
        assert not json.loads((tmp_path / "store" / "a" / "registry.json").read_text())["served"]
        with pytest.raises(Conflict) as err:
            await registry.acquire("a")
        assert err.value.status == 409 and "'a'" in str(err.value) and "deactivated" in str(err.value)

        record = await registry.activate("a")
        assert record.served and record.tier == "device" and record.model_name in registry.model.peft_config
        registry.release(await registry.acquire("a"))

        # deactivating while a request runs: refused for new requests, unloaded at the release
        lease = await registry.acquire("a")
        await registry.deactivate("a")
        with pytest.raises(Conflict):
            await registry.acquire("a")
        assert lease.model_name in registry.model.peft_config
        registry.release(lease)
        await registry.drain()
        assert registry.get("a").tier == "stored" and not registry.model.peft_config
        with pytest.raises(NotFound):
            await registry.activate("missing")

    run(main())
    assert events.of("evicted") == [("a", "device"), ("a", "device")]
    assert events.of("loaded") == [("a", "cpu"), ("a", "stored")]


def test_an_activate_beside_a_deactivate_is_never_refused_as_deactivated(tmp_path):
    """A deactivate that lands while an activate loads wins; the activate answers with the record as it now is
    (it once raised the inference path's 409 "deactivated; activate it before sending requests")."""
    adapter = peft_adapter("lora")

    async def main():
        registry = make_registry(tmp_path / "store")
        await registry.register_files("a", adapter.config, adapter.weights)
        await registry.deactivate("a")
        for _ in range(6):
            results = await asyncio.gather(registry.activate("a"), registry.deactivate("a"), registry.activate("a"),
                                           registry.deactivate("a"), return_exceptions=True)
            assert not [r for r in results if isinstance(r, BaseException)], results
            record = registry.get("a")
            assert record.served == json.loads((tmp_path / "store" / "a" / "registry.json").read_text())["served"]
        await registry.activate("a")                           # and a lone activate still serves it
        registry.release(await registry.acquire("a"))
        await registry.drain()

    run(main())


def test_pin_is_persisted(tmp_path):
    adapter = peft_adapter("lora")

    async def main():
        registry = make_registry(tmp_path / "store")
        await registry.register_files("a", adapter.config, adapter.weights)
        await registry.pin("a", True)
        with pytest.raises(NotFound):
            await registry.pin("b", True)
        again = make_registry(tmp_path / "store")
        await again.scan()
        return again.get("a")

    assert run(main()).pinned


def _slow_engine_call(delay):
    """Runs the model change on another thread after `delay` seconds, like a busy engine would."""
    def call(fn):
        future = concurrent.futures.Future()

        def work():
            time.sleep(delay)
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        threading.Thread(target=work, daemon=True).start()
        return future
    return call


def test_cancelled_acquire_leaves_model_and_records_consistent(tmp_path, monkeypatch):
    adapter = peft_adapter("lora")
    no_wrapping_ahead(monkeypatch)                             # the load takes the (slow) engine's general path

    async def main():
        registry = make_registry(tmp_path / "store", engine_call=_slow_engine_call(0.05))
        await registry.register_files("a", adapter.config, adapter.weights)
        task = asyncio.ensure_future(registry.acquire("a"))
        await asyncio.sleep(0.01)                          # the load is running on the "engine"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await registry.drain()
        record = registry.get("a")
        assert record.in_use == 0 and record.tier == "device"
        assert list(registry.model.peft_config) == [record.model_name]
        lease = await registry.acquire("a")                # already there: no second load
        assert list(registry.model.peft_config) == [lease.model_name]
        registry.release(lease)

    run(main())


def test_delete_during_load_gives_no_lease(tmp_path, monkeypatch):
    adapter = peft_adapter("lora")
    no_wrapping_ahead(monkeypatch)                             # the load takes the (slow) engine's general path

    async def main():
        registry = make_registry(tmp_path / "store", engine_call=_slow_engine_call(0.05))
        await registry.register_files("a", adapter.config, adapter.weights)
        task = asyncio.ensure_future(registry.acquire("a"))
        await asyncio.sleep(0.01)
        await registry.delete("a")
        with pytest.raises(NotFound):
            await task
        await registry.drain()
        assert not registry.model.peft_config
        assert registry.tier_counts() == {"stored": 0, "cpu": 0, "device": 0}

    run(main())


def test_release_from_another_thread(tmp_path):
    adapter = peft_adapter("lora")

    async def main():
        registry = make_registry(tmp_path / "store")
        await registry.register_files("a", adapter.config, adapter.weights)
        lease = await registry.acquire("a")
        await registry.delete("a")
        await asyncio.to_thread(registry.release, lease)
        await asyncio.sleep(0)
        await registry.drain()
        assert not registry.model.peft_config

    run(main())
