"""Served files (`adapter_served_files`, CPU serving): after a stored adapter's first read from its PEFT file, the
loader's saver thread writes its tensors as held beside it (`served.<adapter dtype>.safetensors`), and later loads
map that file (the model's factors then live in the file's pages) instead of reading the PEFT file; the served
adapter is PEFT's every time. A served file made from another version of the stored file is not used, a store
that cannot be written serves as before, the setting off writes none, and `clean` removes half-written ones."""
import os
import time
from pathlib import Path

import pytest
import torch

from adapters_core.packed_file import map_packed, save_packed
from service.registry import store as store_module

from _fixtures import (decoder_logits, hf_logits, input_ids, lora_a_weight, make_registry, mapped_files, peft_adapter,
                       run, served_file, wait_for_file)


class Cycle:
    """Loads of `a` and `b` into a registry with room for one: each load evicts the other back to the store."""

    def __init__(self, root: Path, **kw):
        self.registry = make_registry(root, max_device_adapters=1, single_memory=True, **kw)
        self.ids = input_ids()

    async def load(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        lease = await self.registry.acquire(name)
        try:
            return (decoder_logits(self.registry.model, lease.model_name, self.ids),
                    lora_a_weight(self.registry.model, lease.model_name))
        finally:
            self.registry.release(lease)

    async def register(self, **adapters) -> None:
        for name, adapter in adapters.items():
            await self.registry.register_files(name, adapter.config, adapter.weights)

    async def with_served_file(self, name: str = "a", other: str = "b") -> None:
        """`name` loaded from its upload, evicted, read from its PEFT file (its served file written), evicted."""
        await self.load(name)
        await self.load(other)
        await self.load(name)
        await wait_for_file(self.served(name))
        await self.load(other)

    def served(self, name: str) -> Path:
        return served_file(self.registry, name)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("adapter_dtype", ["auto", "bfloat16"])
def test_later_loads_map_the_served_file_and_serve_the_same_adapter(tmp_path, monkeypatch, adapter_dtype):
    a, b = peft_adapter("lora", seed=3), peft_adapter("lora", seed=4)

    async def main():
        cycle = Cycle(tmp_path / "store", adapter_dtype=adapter_dtype)
        await cycle.register(a=a, b=b)
        uploaded, _ = await cycle.load("a")                   # from the upload, in memory
        await cycle.load("b")
        assert not cycle.served("a").exists()
        read, factor = await cycle.load("a")                  # read from the PEFT file, then saved
        assert str(cycle.served("a")) not in mapped_files(factor)
        await wait_for_file(cycle.served("a"))
        await cycle.load("b")
        monkeypatch.setattr(cycle.registry.store, "read_packed", lambda *args: pytest.fail("read the PEFT file"))
        mapped, factor = await cycle.load("a")
        assert str(cycle.served("a")) in mapped_files(factor)
        torch.testing.assert_close(mapped, read, atol=0, rtol=0)
        torch.testing.assert_close(mapped, uploaded, atol=0, rtol=0)
        if adapter_dtype == "auto":
            torch.testing.assert_close(mapped, hf_logits(a.model, cycle.ids), atol=1e-4, rtol=1e-4)
        cycle.registry.close()
    run(main())


def test_a_served_file_of_another_version_of_the_stored_file_is_not_used(tmp_path):
    a, b, other = peft_adapter("lora", seed=3), peft_adapter("lora", seed=4), peft_adapter("lora", seed=5)

    async def main():
        cycle = Cycle(tmp_path / "store")
        await cycle.register(a=a, b=b)
        await cycle.with_served_file()
        # the stored file rewritten in place (same folder, same name): the served file is now stale
        (Path(cycle.registry.store.path("a")) / "adapter_model.safetensors").write_bytes(other.weights)
        logits, factor = await cycle.load("a")
        assert str(cycle.served("a")) not in mapped_files(factor)
        torch.testing.assert_close(logits, hf_logits(other.model, cycle.ids), atol=1e-4, rtol=1e-4)
        cycle.registry.close()
    run(main())


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_a_served_file_holding_a_base_copy_is_served_without_it(tmp_path):
    """Served files are written with the adapter's own tensors only, and one of only LoRA factors is used as
    mapped; one that also holds a copy of a base weight (as files of older servers did) still has it left out:
    the load serves PEFT's adapter from the mapped file, and the base stays as it was."""
    a, b = peft_adapter("lora", seed=3), peft_adapter("lora", seed=4)

    async def main():
        cycle = Cycle(tmp_path / "store")
        await cycle.register(a=a, b=b)
        await cycle.with_served_file()
        served = str(cycle.served("a"))
        tensors, metadata = map_packed(served)
        tensors = {k: v.clone() for k, v in tensors.items()}
        key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
        layer = key[:-len("lora_A.weight")]
        width = tensors[key].shape[1]
        tensors[layer + "base_layer.weight"] = torch.full((tensors[layer + "lora_B.weight"].shape[0], width), 7.0)
        save_packed(served, tensors, dict(metadata, keys=store_module.keys_digest(tensors)))
        with torch.no_grad():
            base = cycle.registry.model(cycle.ids).float()             # (no adapter active: the base model)
        logits, factor = await cycle.load("a")
        assert served in mapped_files(factor)
        torch.testing.assert_close(logits, hf_logits(a.model, cycle.ids), atol=1e-4, rtol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(cycle.registry.model(cycle.ids).float(), base, atol=0, rtol=0)
        cycle.registry.close()
    run(main())


@pytest.mark.parametrize("why", ["setting off", "store not writable"])
def test_without_served_files_every_load_reads_the_peft_file(tmp_path, monkeypatch, why):
    a, b = peft_adapter("lora", seed=3), peft_adapter("lora", seed=4)
    if why == "store not writable":
        def refuse(*args):
            raise PermissionError("read-only file system")
        monkeypatch.setattr(store_module, "save_packed", refuse)

    async def main():
        cycle = Cycle(tmp_path / "store", served_files=why != "setting off")
        await cycle.register(a=a, b=b)
        for _ in range(3):
            logits, _ = await cycle.load("a")
            torch.testing.assert_close(logits, hf_logits(a.model, cycle.ids), atol=1e-4, rtol=1e-4)
            await cycle.load("b")
        cycle.registry.close()
        assert not list((tmp_path / "store").rglob("served.*"))
    run(main())


def test_clean_removes_half_written_served_files(tmp_path):
    a = peft_adapter("lora", seed=3)

    async def main():
        registry = make_registry(tmp_path / "store", single_memory=True)
        await registry.register_files("a", a.config, a.weights)
        registry.close()
    run(main())
    folder = tmp_path / "store" / "a"
    (folder / "served.auto.safetensors.0123abcd.tmp").write_bytes(b"half")
    removed = store_module.AdapterStore(str(tmp_path / "store")).clean()
    assert removed == ["a/served.auto.safetensors.0123abcd.tmp"] and not list(folder.glob("*.tmp"))


def test_a_stored_file_rewritten_with_its_old_times_put_back_is_noticed(tmp_path):
    """Same size, modification time restored (`touch -r`): the change time still moves, and the served file made
    from the old contents is not used (a probe got the old adapter's answers before)."""
    a, b, other = peft_adapter("lora", seed=3), peft_adapter("lora", seed=4), peft_adapter("lora", seed=5)

    async def main():
        cycle = Cycle(tmp_path / "store")
        await cycle.register(a=a, b=b)
        await cycle.with_served_file()
        stored = Path(cycle.registry.store.path("a")) / "adapter_model.safetensors"
        before = os.stat(stored)
        assert len(other.weights) == before.st_size
        time.sleep(0.01)                                    # a change time of its own
        with open(stored, "r+b") as fh:                     # in place: same inode, same size
            fh.write(other.weights)
        os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))
        logits, factor = await cycle.load("a")
        assert str(cycle.served("a")) not in mapped_files(factor)
        torch.testing.assert_close(logits, hf_logits(other.model, cycle.ids), atol=1e-4, rtol=1e-4)
        cycle.registry.close()
    run(main())


@pytest.mark.parametrize("damage", ["truncated", "not json", "a list", "emptied, metadata kept",
                                    "a tensor dropped, metadata kept"])
def test_a_damaged_served_file_is_read_past(tmp_path, damage):
    a, b = peft_adapter("lora", seed=3), peft_adapter("lora", seed=4)

    async def main():
        cycle = Cycle(tmp_path / "store")
        await cycle.register(a=a, b=b)
        await cycle.with_served_file()
        data = cycle.served("a").read_bytes()
        if damage.endswith("metadata kept"):                # a valid packed file with other tensors (a probe's
            tensors, metadata = map_packed(str(cycle.served("a")))       # 422 "lacks tensors" that stuck)
            tensors = {} if damage.startswith("emptied") else dict(list(tensors.items())[1:])
            save_packed(str(cycle.served("a")), {k: v.clone() for k, v in tensors.items()}, metadata)
        else:
            cycle.served("a").write_bytes({"truncated": data[:-3], "not json": b"\x10\0\0\0\0\0\0\0" + b"{" * 16,
                                           "a list": b"\x08\0\0\0\0\0\0\0[1,2,3] "}[damage])
        logits, factor = await cycle.load("a")
        assert str(cycle.served("a")) not in mapped_files(factor)
        torch.testing.assert_close(logits, hf_logits(a.model, cycle.ids), atol=1e-4, rtol=1e-4)
        cycle.registry.close()
    run(main())


def test_a_load_that_maps_its_served_file_keeps_the_gil(tmp_path):
    """The loader thread's whole part of a load from a served file (config, identity, mapping, checks,
    preparing the layers) never lets the GIL go while the page cache holds the files: beside a thread running
    Python each give-up waited up to the 5 ms switch interval (in one process on the 2-core Zen 3, a read's p50
    12.8-16.0 ms beside such a thread before, 3.0-5.6 ms after: BENCHMARKS.md, thirty-seventh session)."""
    from adapters_core import held_io, sgmv
    from gil_check import lets_the_gil_go
    if not held_io.available() or sgmv.kernel() is None:
        pytest.skip("needs libc through ctypes and the native kernels (else Python's calls let the GIL go)")
    a, b = peft_adapter("lora", seed=3), peft_adapter("lora", seed=4)

    async def main():
        cycle = Cycle(tmp_path / "store")
        await cycle.register(a=a, b=b)
        await cycle.with_served_file("a", "b")
        record = cycle.registry._records["a"]
        kept = []
        assert not lets_the_gil_go(lambda: kept.append(cycle.registry._read_stored("a", record.model_name)))
        assert kept[-1][2] is not None                       # prepared from the mapping, as a server's load
        assert str(cycle.served("a")) in mapped_files(next(iter(kept[-1][1].values())))
        cycle.registry.close()
    run(main())
