"""Loads read on the event loop (CPU serving with served files, `TierMixin._read_inline`): a load whose served file
is at most `INLINE_READ_BYTES` and wholly in the page cache is read where its request is taken in, never handed to
the loader thread (no wait for it, none for the loop after it), its factors in the file's mapping, PEFT's answers
served; one with a page out of the page cache is first filled on the map thread. A first load (no served file
yet), a larger file, a stale one (the stored file rewritten since) and served files off go to the loader thread
and serve PEFT's answers too."""
from pathlib import Path

import pytest
import torch

from adapters_core import held_io, packed_file
from service.registry import reads

from _fixtures import (Events, decoder_logits, hf_logits, input_ids, lora_a_weight, make_registry, mapped_files,
                       peft_adapter, run, served_file, store_with_served_files)

pytestmark = pytest.mark.skipif(not packed_file.can_premap(), reason="needs Linux's libc with statx")


def _record_loader_reads(registry, names: list) -> None:
    """Each adapter the registry's loader thread is asked to read appended to `names`."""
    real = registry._in_loader

    async def in_loader(name, fn, *args):
        names.append(name)
        return await real(name, fn, *args)
    registry._in_loader = in_loader


def _loads(tmp_path, adapters: dict, prepare=None, **kw) -> tuple[list[str], Events]:
    """A registry restarted over a store whose adapters have served files (`prepare(registry)` then called), each
    adapter acquired once and checked against PEFT's logits; (the names whose reads went to the loader thread,
    the events)."""
    on_loader, events = [], Events()

    async def main():
        await store_with_served_files(tmp_path / "store", adapters)
        registry = make_registry(tmp_path / "store", max_device_adapters=len(adapters), single_memory=True,
                                 events=events, **kw)
        await registry.scan()
        if prepare is not None:
            prepare(registry)
        _record_loader_reads(registry, on_loader)
        ids = input_ids()
        try:
            for name, adapter in adapters.items():
                lease = await registry.acquire(name)
                try:
                    torch.testing.assert_close(decoder_logits(registry.model, lease.model_name, ids),
                                               hf_logits(adapter.model, ids), atol=1e-4, rtol=1e-4)
                    if not on_loader:
                        assert served_file(registry, name).as_posix() in mapped_files(
                            lora_a_weight(registry.model, lease.model_name))
                finally:
                    registry.release(lease)
        finally:
            registry.close()
    run(main())
    return on_loader, events


ADAPTERS = {"a": 10, "b": 11}


def _adapters() -> dict:
    return {name: peft_adapter("lora", seed=seed) for name, seed in ADAPTERS.items()}


def test_a_load_of_a_cached_served_file_is_read_on_the_event_loop(tmp_path):
    on_loader, events = _loads(tmp_path, _adapters())
    assert on_loader == []
    assert [(name, queued, resumed) for name, queued, _, resumed in events.reads] == [("a", 0.0, 0.0),
                                                                                     ("b", 0.0, 0.0)]
    assert all(seconds > 0 for *_, seconds, _ in events.reads)


def test_a_served_file_with_pages_out_of_the_page_cache_is_filled_on_the_map_thread(tmp_path, monkeypatch):
    """A page of the file not cached (the kernel reclaimed some): the map thread maps and fills it (a disk read,
    the GIL released), then the loop reads it; the fill is reported as the read's wait."""
    monkeypatch.setattr(held_io, "populate_if_resident", lambda address, length, advice: False)
    on_loader, events = _loads(tmp_path, _adapters())
    assert on_loader == []
    assert [(name, resumed) for name, _, _, resumed in events.reads] == [("a", 0.0), ("b", 0.0)]
    assert all(queued > 0 and seconds > 0 for _, queued, seconds, _ in events.reads)


@pytest.mark.parametrize("why", ["larger than the bound", "stale", "served files off"])
def test_other_loads_go_to_the_loader_thread(tmp_path, monkeypatch, why):
    prepare = None
    if why == "larger than the bound":
        monkeypatch.setattr(reads, "INLINE_READ_BYTES", 1024)
    elif why == "stale":
        def prepare(registry):              # the stored files rewritten with the same bytes: a new source identity
            for name in ADAPTERS:
                path = Path(registry.store.path(name)) / "adapter_model.safetensors"
                data = path.read_bytes()
                path.unlink()
                path.write_bytes(data)
    on_loader, _ = _loads(tmp_path, _adapters(), prepare, **({"served_files": False} if why == "served files off"
                                                             else {}))
    assert on_loader == list(ADAPTERS)


def test_a_first_load_goes_to_the_loader_thread(tmp_path):
    """A registered adapter never loaded has no served file: its PEFT file is read on the loader thread."""
    adapter = peft_adapter("lora", seed=12)
    on_loader = []

    async def main():
        registry = make_registry(tmp_path / "store", max_device_adapters=1, single_memory=True)
        await registry.register_files("c", adapter.config, adapter.weights)
        registry.close()
        registry = make_registry(tmp_path / "store", max_device_adapters=1, single_memory=True)
        await registry.scan()
        _record_loader_reads(registry, on_loader)
        lease = await registry.acquire("c")
        try:
            torch.testing.assert_close(decoder_logits(registry.model, lease.model_name, input_ids()),
                                       hf_logits(adapter.model, input_ids()), atol=1e-4, rtol=1e-4)
        finally:
            registry.release(lease)
            registry.close()
    run(main())
    assert on_loader == ["c"]
