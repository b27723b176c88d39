"""`MapAhead` (CPU serving with served files): loads that queue behind another on the loader thread have their
served files mapped ahead on a thread of their own, and the loader's reads take those mappings; every adapter
of such a burst serves PEFT's answers. A load with nothing ahead of it is not mapped ahead; with served files
off nothing is. (Served files within a bound are read on the event loop, `test_inline_read.py`: here the bound
is 0, so the loader thread reads every load.)"""
import asyncio
import threading
import time

import pytest
import torch

from adapters_core import packed_file
from service.registry import map_ahead, reads

from _fixtures import (decoder_logits, hf_logits, input_ids, lora_a_weight, make_registry, peft_adapter, run,
                       store_with_served_files)

pytestmark = pytest.mark.skipif(not packed_file.can_premap(), reason="premap needs Linux's libc with statx")


@pytest.fixture(autouse=True)
def no_reads_on_the_event_loop(monkeypatch):
    """Every served file is over the bound of loads read on the event loop: all go to the loader thread."""
    monkeypatch.setattr(reads, "INLINE_READ_BYTES", 0)

NAMES = "abcd"


def test_a_burst_of_loads_reads_files_mapped_ahead_and_serves_peft(tmp_path, monkeypatch):
    adapters = {name: peft_adapter("lora", seed=10 + i) for i, name in enumerate(NAMES)}
    made, one_made = [], threading.Event()

    def spy(path):
        made.append(packed_file.premap(path))
        one_made.set()
        return made[-1]
    monkeypatch.setattr(map_ahead, "premap", spy)

    async def main():
        await store_with_served_files(tmp_path / "store", adapters)
        registry = make_registry(tmp_path / "store", max_device_adapters=len(NAMES), single_memory=True)
        await registry.scan()
        real_read = registry._read_stored

        def read(*args):
            # the loader's first read ends once every other load is queued behind it (on a busy machine the last
            # acquire could otherwise come after the reads before it were taken back) and one premap is made (the
            # map-ahead threads could otherwise start after the loader's second read)
            deadline = time.monotonic() + 10
            while registry._map_ahead.started < len(NAMES) - 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            one_made.wait(10)
            return real_read(*args)
        registry._read_stored = read
        leases = await asyncio.gather(*(registry.acquire(name) for name in NAMES))   # queued at once
        ids = input_ids()
        try:
            assert registry._map_ahead.started == len(NAMES) - 1               # (the first had none ahead)
            assert 1 <= len(made) <= registry._map_ahead.started  # (one the loader reached first: cancelled)
            taken = 0
            for name, lease in zip(NAMES, leases):
                factor = lora_a_weight(registry.model, lease.model_name)
                taken += any(got.address <= factor.data_ptr() < got.address + len(got.mapped) for got in made)
                torch.testing.assert_close(decoder_logits(registry.model, lease.model_name, ids),
                                           hf_logits(adapters[name].model, ids), atol=1e-4, rtol=1e-4)
            assert taken >= 1                # (the second load's, at least: one not done when reached is read past)
        finally:
            for lease in leases:
                registry.release(lease)
            registry.close()
    run(main())


@pytest.mark.parametrize("served_files", [True, False])
def test_a_lone_load_is_not_mapped_ahead(tmp_path, served_files):
    adapters = {name: peft_adapter("lora", seed=20 + i) for i, name in enumerate("ab")}

    async def main():
        await store_with_served_files(tmp_path / "store", adapters)
        registry = make_registry(tmp_path / "store", max_device_adapters=2, single_memory=True,
                                 served_files=served_files)
        await registry.scan()
        for name in adapters:
            registry.release(await registry.acquire(name))              # one after another
        assert registry._map_ahead.started == 0
        registry.close()
    run(main())
