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
from typing import Iterable, Iterator, Optional

import torch

import adapters_core as ac
from adapters_core.prepared import PreparedAdapter, attach_prepared, preparable

from .adapter_dtype import held_dtype
from .errors import Conflict, Invalid, NotFound, RegistryError, Unavailable
from .reads import _Retry
from .record import CPU, DEVICE, STORED, AdapterRecord

log = logging.getLogger("service.registry")

class TierMixin:
    """Tiers, loads and evictions for `AdapterRegistry` (whose state and plumbing it uses)."""

    # ----- tiers --------------------------------------------------------------------------------------------
    def _residents(self) -> Iterator[AdapterRecord]:
        return itertools.chain(self._records.values(), self._retired, self._merged.values())

    def _count(self, tier: str) -> int:
        return sum(1 for r in self._residents() if r.tier == tier)

    def _lru(self, tier: str) -> Optional[AdapterRecord]:
        victims = _evictable_first(r for r in self._residents() if r.tier == tier)
        return victims[0] if victims else None

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
        """Bring `record` to the device tier. The lock is held on entry and on return, but released while
        the files are read and while the engine applies the change: loads of other adapters go on meanwhile
        (and their engine calls share a step boundary); a second caller for the same record waits for the
        first one's load and then looks again."""
        while record.pending is not None:
            await self._unlocked(asyncio.shield(record.pending))
        if record.tier == DEVICE:
            return
        record.pending = asyncio.get_running_loop().create_future()
        try:
            await self._bring_up(record)
        finally:
            record.pending.set_result(None)
            record.pending = None

    async def _bring_up(self, record: AdapterRecord) -> None:
        started, from_tier = time.perf_counter(), record.tier
        record.busy = True
        refused = False             # no room now (a turn to wait for, not a failed load: not counted as one)
        try:
            # no read for a load that would find no room (requests waiting for a slot try again at every release;
            # a first load's size is not known before its read)
            room = self._room_for(record, record.memory_size if record.resident_size is not None else 0)
            if isinstance(room, Unavailable):
                refused = True
                raise room
            if record.tensors is None:
                try:
                    config, tensors, prepared, extra = await self._read_for_load(record)     # (reads.py)
                except (OSError, RegistryError) as exc:
                    if record.retired:
                        raise _Retry() from exc
                    if isinstance(exc, Invalid):       # fails today's checks: never try it again
                        record.error, record.served = f"cannot be loaded: {exc}", False
                        log.warning("adapter %r is quarantined: %s", record.name, exc)
                        raise Conflict(f"adapter {record.name!r} is quarantined: {record.error}; replace or "
                                       f"delete it, or put its files right and rescan") from exc
                    raise RegistryError(f"stored adapter {record.name!r} cannot be read: {exc}") from exc
                if record.retired:          # replaced while reading: these may be the new files
                    raise _Retry()
                record.config, record.tensors, record.tier = config, tensors, CPU
                record.dtype, record.resident_size = held_dtype(tensors), record.size + extra
            else:                           # in the cpu tier (an upload, an eviction): pack and prepare it
                record.tensors, prepared = await self._unlocked(self._in_loader(
                    record.name, self._prepare_load, record.config, record.tensors, record.model_name))
                if record.retired:
                    raise _Retry()
            if prepared is None and self._engine_loads and preparable(record.config, record.model_name):
                # the model's layers are being wrapped by a load on the engine thread (the first load of a
                # server, or the first on these modules): once it is in, this one is prepared again (here: ~0.2
                # ms, not behind the loader's queue) and attached beside the step, instead of queueing for a step
                # boundary behind it (a burst of cold loads)
                await self._unlocked(asyncio.wait(set(self._engine_loads)))
                if record.retired:
                    raise _Retry()
                record.tensors, prepared = self._prepare_load(record.config, record.tensors, record.model_name,
                                                              packed=True)
            conflicts = []
            try:
                conflicts = self._take_conflicting(record)
                victims = conflicts + self._take_device_room(record)
            except (Unavailable, Conflict):
                self._settle_victims(conflicts, [v.model_name for v in conflicts])   # none of them leaves
                if from_tier == STORED and self.single_memory:
                    record.drop_tensors()       # a refusal leaves it where it was
                    record.tier = STORED
                refused = True
                raise
            for victim in conflicts:
                if not victim.retired:
                    self._emit("adapter_evicted", victim.name, DEVICE)
            config, tensors, model_name = copy.deepcopy(record.config), record.tensors, record.model_name
            # counted from now, so concurrent loads make room around it (and no yield of an earlier stay applies)
            record.tier, record.yielding_to = DEVICE, None
            # (an adapter sharing a module the other way must leave the model before this one goes in)
            applied = None if conflicts else self._attach_now(record, prepared, victims)
            if applied is None:             # between two steps, on the engine thread
                failed, applied, error = [v.model_name for v in victims], 0.0, None   # if the call never ran
                done = asyncio.get_running_loop().create_future()
                self._engine_loads.add(done)
                try:
                    failed, applied, error = await self._unlocked(self._on_engine(
                        lambda: _swap(self.model, [v.model_name for v in victims], model_name, config, tensors,
                                      prepared, self.adapter_dtype.factor_dtype)))
                finally:
                    self._engine_loads.discard(done)
                    done.set_result(None)
                    self._settle_victims(victims, failed)
                    if error is not None or applied == 0.0:
                        if record.tier == DEVICE:
                            record.tier = CPU
                if error is not None:
                    raise error
            self._emit("adapter_applied", record.name, applied)
            if record.tier == DEVICE and self.single_memory and record.source.get("type") != "merged":
                record.tensors = None       # CPU serving: the model holds the only copy; the store has the files
        except _Retry:
            raise
        except ac.ModuleConflictError as exc:    # a holder that was still leaving the model: its turn ends soon
            raise Unavailable(f"cannot load adapter {record.name!r} now: another adapter holds a module it needs "
                              f"the other way (a modules_to_save copy beside a LoRA / IA3 on one module); retry "
                              f"later") from exc
        except ac.AdapterError as exc:
            self._emit("adapter_load_failed", record.name)
            raise Invalid(f"adapter {record.name!r} cannot be loaded into the model: {exc}") from exc
        except BaseException:
            if not refused:
                self._emit("adapter_load_failed", record.name)
            raise
        finally:
            record.busy = False
            self._enforce_cpu_limit()
        self._emit("adapter_loaded", record.name, time.perf_counter() - started, from_tier)

    def _attach_now(self, record: AdapterRecord, prepared: Optional[PreparedAdapter],
                    victims: list[AdapterRecord]) -> Optional[float]:
        """On the CPU, a prepared adapter is attached at once, beside the step that may be running: it only
        adds entries the step does not read (its requests wait for this load), with single dict writes, and
        the engine's look-ups never iterate those dicts (`SlotTable.name_of`). Its slot is written at the
        next step that uses it. The victims leave the model at the next step boundary (each one's `pending`,
        set when it was chosen, holds off a new load of it until then). Returns the seconds spent, or None
        when this path does not apply (the caller goes through the engine)."""
        if prepared is None or not self.single_memory:
            return None
        started = time.perf_counter()
        try:
            with self._model_lock:
                attached = attach_prepared(self.model, prepared)
        except BaseException:
            self._settle_victims(victims, [v.model_name for v in victims])      # nothing was removed
            if record.tier == DEVICE:
                record.tier = CPU
            raise
        if not attached:
            return None
        if victims:
            self._spawn(self._evict(victims), background=True)
        return max(time.perf_counter() - started, 1e-9)

    async def _evict(self, victims: list[AdapterRecord]) -> None:
        """Remove `_take_device_room`'s victims from the model: in one engine call, or, on the CPU with the
        engine's step gate, on the evictor thread while a step's C++ loop runs (no request uses a victim, and
        that loop reads only the tables' rows and tensors of the batch's adapters)."""
        names = [v.model_name for v in victims]
        failed = names
        try:
            if self._evictor is not None and self.single_memory:
                failed = await asyncio.get_running_loop().run_in_executor(self._evictor, self._remove_gated, names)
            else:
                failed = await self._on_engine(lambda: _remove_all(self.model, names))
        finally:
            self._settle_victims(victims, failed)

    def _remove_gated(self, names: list[str]) -> list[str]:
        """Evictor thread: `_remove_all` holding the step gate (first: a step holds it) and the model lock."""
        with self.step_gate, self._model_lock:
            return _remove_all(self.model, names)

    async def _unlocked(self, awaitable):
        """Await `awaitable` with the registry lock released (the caller holds it, and holds it again after)."""
        self._lock.release()
        try:
            return await awaitable
        finally:
            await self._lock.acquire()

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

    async def _evict_one(self, record: AdapterRecord) -> bool:
        """Out of the device tier on request (lock held), as an LRU victim leaves it (to the cpu tier, or to the
        store when the model held its only copy); never pinned, used or busy. Whether it left."""
        if record.tier != DEVICE or record.in_use or record.busy or record.pinned or record.retired:
            return False
        record.tier, record.busy = (STORED if record.tensors is None else CPU), True
        self._emit("adapter_evicted", record.name, DEVICE)
        await self._evict([record])
        self._enforce_cpu_limit()
        return record.tier != DEVICE

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


def _remove_all(model, names: list[str]) -> list[str]:
    """Engine thread: remove every named adapter; returns those whose removal failed (a bug, not an input
    error: it is logged, and the adapter stays listed on the device)."""
    failed = []
    for name in names:
        try:
            _remove(model, name)
        except Exception:
            log.exception("removing adapter %r from the model failed", name)
            failed.append(name)
    return failed


def _swap(model, remove: list[str], model_name: str, config: ac.AdapterConfig, tensors: dict,
          prepared: Optional[PreparedAdapter] = None,
          factor_dtype: Optional[torch.dtype] = None) -> tuple[list, float, Optional[BaseException]]:
    """Engine thread: remove the evicted adapters, then add `model_name` (attaching what a worker thread
    prepared when it can, else loading it in full). Returns the names whose removal failed, the seconds
    spent (> 0) and the load's error, if any. One call, so an eviction and its load share a step boundary."""
    started, error = time.perf_counter(), None
    failed = _remove_all(model, remove)
    try:
        if prepared is None or not attach_prepared(model, prepared):
            _inject(model, model_name, config, tensors, factor_dtype)
    except Exception as exc:
        error = exc
    return failed, max(time.perf_counter() - started, 1e-9), error


def _inject(model, model_name: str, config: ac.AdapterConfig, tensors: dict,
            factor_dtype: Optional[torch.dtype] = None) -> None:
    """Engine thread. Serving selects adapters per token through slot mappings, so no adapter is left
    "active" in PEFT's sense: a plain forward of the model stays the base model. The factors are held in
    `factor_dtype` (adapter_dtype's) whatever the base model's dtype; None: PEFT's rule."""
    ac.load_adapter(model, model_name, adapter_name=model_name, config=config, state_dict=tensors,
                    low_cpu_mem_usage=True, autocast_adapter_dtype=False, factor_dtype=factor_dtype)
    ac.set_adapter(model, [])


def _remove(model, model_name: str) -> None:
    """Engine thread; deactivating first (when anything is active: the registry loads adapters inactive)
    spares delete_adapter's "was active" warning."""
    if ac.active_adapters(model):
        ac.set_adapter(model, [])
    ac.delete_adapter(model, model_name)


def _evictable_first(records: Iterable[AdapterRecord]) -> list[AdapterRecord]:
    """Of `records`, the eviction victims in order: deleted ones first, then least recently used; never pinned,
    used or busy."""
    return sorted((r for r in records if r.in_use == 0 and not r.busy and (r.retired or not r.pinned)),
                  key=lambda r: (not r.retired, r.tick))
