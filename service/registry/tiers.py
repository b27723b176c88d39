"""Tiers and eviction (`TierMixin` of `AdapterRegistry`, registry.py): counting and LRU choice per tier,
loading an adapter up to the device tier (making room by evicting unpinned, unused ones), unloading it down
again, and the engine-thread functions that inject an adapter into the model and remove it. Model changes go
through the registry's engine calls; the mixin uses the registry's state and plumbing."""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import time
from typing import Iterator, Optional

import adapters_core as ac
from adapters_core.io import SAFETENSORS_NAME

from .errors import Conflict, Invalid, NotFound, RegistryError, Unavailable
from .record import CPU, DEVICE, STORED, AdapterRecord
from .validation import check_tensors, parse_config

log = logging.getLogger("service.registry")


class _Retry(Exception):
    """The record was deleted or replaced while a load waited; look the name up again."""


class TierMixin:
    """Tiers, loads and evictions for `AdapterRegistry` (whose state and plumbing it uses)."""

    # ----- tiers --------------------------------------------------------------------------------------------
    def _residents(self) -> Iterator[AdapterRecord]:
        return itertools.chain(self._records.values(), self._retired, self._merged.values())

    def _count(self, tier: str) -> int:
        return sum(1 for r in self._residents() if r.tier == tier)

    def _lru(self, tier: str, exclude: Optional[AdapterRecord] = None) -> Optional[AdapterRecord]:
        """The eviction victim: deleted ones first, then least recently used; never pinned, used or busy."""
        candidates = [r for r in self._residents() if r.tier == tier and r is not exclude and r.in_use == 0
                      and not r.busy and (r.retired or not r.pinned)]
        return min(candidates, key=lambda r: (not r.retired, r.tick), default=None)

    def _enforce_cpu_limit(self) -> None:
        while self._count(CPU) > self.max_cpu_adapters:
            victim = self._lru(CPU)
            if victim is None:          # everything in RAM is pinned or in use: allow the overshoot
                return
            victim.drop_tensors()
            victim.tier = STORED
            if victim.source.get("type") == "merged":     # derived: nothing stored to load it from again
                self._forget_merged(victim)
                continue
            if not victim.retired:
                self._emit("adapter_evicted", victim.name, CPU)

    async def _load_for_lease(self, record: AdapterRecord) -> None:
        if record.retired:
            raise _Retry()
        if not record.served:
            raise Conflict(f"adapter {record.name!r} is deactivated; activate it before sending requests")
        await self._load(record)

    async def _load_live(self, record: AdapterRecord) -> None:
        try:
            await self._load_for_lease(record)
        except _Retry:
            raise NotFound(f"adapter {record.name!r} was deleted") from None

    async def _load(self, record: AdapterRecord) -> None:
        """Bring `record` to the device tier (lock held)."""
        if record.tier == DEVICE:
            return
        started, from_tier = time.perf_counter(), record.tier
        record.busy = True
        try:
            if record.tensors is None:
                try:
                    config, tensors = await asyncio.to_thread(self._read_stored, record.name)
                except (OSError, RegistryError) as exc:
                    if record.retired:
                        raise _Retry() from exc
                    if isinstance(exc, Invalid):       # fails today's checks: never try it again
                        record.error, record.served = f"cannot be loaded: {exc}", False
                        log.warning("adapter %r is quarantined: %s", record.name, exc)
                        raise Conflict(f"adapter {record.name!r} is quarantined: {record.error}; replace or "
                                       f"delete it") from exc
                    raise RegistryError(f"stored adapter {record.name!r} cannot be read: {exc}") from exc
                if record.retired:          # replaced while reading: these may be the new files
                    raise _Retry()
                record.config, record.tensors, record.tier = config, tensors, CPU
            await self._make_device_room(record)
            config, tensors, model_name = copy.deepcopy(record.config), record.tensors, record.model_name
            await self._on_engine(lambda: _inject(self.model, model_name, config, tensors))
            record.tier = DEVICE
        except _Retry:
            raise
        except ac.AdapterError as exc:
            self._emit("adapter_load_failed", record.name)
            raise Invalid(f"adapter {record.name!r} cannot be loaded into the model: {exc}") from exc
        except BaseException:
            self._emit("adapter_load_failed", record.name)
            raise
        finally:
            record.busy = False
            self._enforce_cpu_limit()
        self._emit("adapter_loaded", record.name, time.perf_counter() - started, from_tier)

    def _read_stored(self, name: str) -> tuple[ac.AdapterConfig, dict]:
        folder = self.store.path(name)
        config, tensors = parse_config(self.store.read_config(folder)), self.store.read_tensors(folder)
        check_tensors(tensors, SAFETENSORS_NAME)
        return config, tensors

    async def _make_device_room(self, record: AdapterRecord) -> None:
        while self._count(DEVICE) >= self.max_device_adapters:
            victim = self._lru(DEVICE, exclude=record)
            if victim is None:
                raise Unavailable(
                    f"cannot load adapter {record.name!r}: all {self.max_device_adapters} device slots "
                    f"(max_device_adapters={self.max_device_adapters}) hold pinned or in-use adapters; retry later")
            await self._unload_from_model(victim)
            if not victim.retired:
                self._emit("adapter_evicted", victim.name, DEVICE)

    async def _unload_from_model(self, record: AdapterRecord) -> None:
        """device -> cpu. The tier changes before the engine call so that no acquire takes a lease on an
        adapter being removed (it waits for the lock and loads it again)."""
        record.tier, record.busy = CPU, True
        model_name = record.model_name
        try:
            await self._on_engine(lambda: _remove(self.model, model_name))
        except BaseException:
            record.tier = DEVICE
            raise
        finally:
            record.busy = False

    async def _unload(self, record: AdapterRecord) -> None:
        """A deactivated adapter nobody uses: out of the model and out of RAM (lock held)."""
        if record.in_use or record.served or record.retired or record.tier == STORED:
            return
        from_tier = record.tier
        if record.tier == DEVICE:
            await self._unload_from_model(record)
        record.drop_tensors()
        record.tier = STORED
        self._emit("adapter_evicted", record.name, from_tier)


def _inject(model, model_name: str, config: ac.AdapterConfig, tensors: dict) -> None:
    """Engine thread. Serving selects adapters per token through slot mappings, so no adapter is left
    "active" in PEFT's sense: a plain forward of the model stays the base model."""
    ac.load_adapter(model, model_name, adapter_name=model_name, config=config, state_dict=tensors,
                    low_cpu_mem_usage=True, autocast_adapter_dtype=False)
    ac.set_adapter(model, [])


def _remove(model, model_name: str) -> None:
    """Engine thread; deactivating first also spares delete_adapter's "was active" warning."""
    ac.set_adapter(model, [])
    ac.delete_adapter(model, model_name)
