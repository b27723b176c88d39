"""`AdapterRegistry`: every adapter the service knows, in three tiers, with LRU eviction, pins and leases.

Tiers: *stored* (files in the store only), *cpu* (config and tensors in RAM, at most `max_cpu_adapters`)
and *device* (injected into the model, at most `max_device_adapters`). `acquire(name)` returns a `Lease`
on an adapter in the device tier, loading it first if needed and evicting least-recently-used adapters
that are neither pinned nor in use (device -> cpu, cpu -> stored), so thousands can be registered while a
few hundred are hot; `release(lease)` gives it back. An adapter with a lease is never evicted or freed:
`delete` (and a replacing registration) takes the name away at once, so new acquires get 404 or the new
adapter, and frees the old one's memory at its last release. Each registration has its own name inside
the model (`Lease.model_name`), so a reused name never collides with the adapter it replaced.

Concurrency: all bookkeeping runs on the event loop; model changes (`ac.load_adapter` /
`ac.delete_adapter`) go through `engine_call`, which runs them between two engine steps, and leave no
adapter PEFT-"active" (serving picks adapters per token by slot), so a plain forward is the base model.
Loads and unloads are serialised by one asyncio lock and run as shielded tasks, so a cancelled request
never leaves the model and the records disagreeing. File work and validation run in worker threads. A
registration is validated completely in a staging folder before it changes anything (see
validation.py). Names equal to the base model's id (`reserved_names`, compared case-insensitively)
are refused with 409, route words with 422 (`check_name`). A stored adapter that fails today's checks at
start-up (or when it is read to be loaded) is kept as a *quarantined* record: listed with its error, refused
with 409 by acquire / activate / deactivate / pin, and gone once it is deleted or replaced.
This module has the look-ups, leases (acquire, release, retirement of deleted or replaced registrations at
their last release), the admin verbs and the plumbing; registration and store scans are in registration.py,
tiers and eviction in tiers.py, loads' reads in reads.py and LoRAX's merged adapters (`acquire_merged`) in
merged.py (mixins of the one class).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional

import torch

from .adapter_dtype import AdapterDtype
from .device_room import DeviceRoomMixin
from .errors import Conflict, NotFound, Unavailable
from .map_ahead import MapAhead
from .merged import MergedMixin
from .reads import ReadMixin
from .record import DEVICE, STORED, TIERS, AdapterRecord, Lease
from .registration import RegistrationMixin
from .slot_wait import SlotWait
from .store import AdapterStore
from .tiers import TierMixin, _Retry
from .turns import TurnMixin
from .validation import AdapterValidator

log = logging.getLogger("service.registry")

EngineCall = Callable[[Callable[[], Any]], Future]


class AdapterRegistry(RegistrationMixin, TierMixin, ReadMixin, DeviceRoomMixin, TurnMixin, MergedMixin):
    def __init__(self, model, engine_call: EngineCall, adapter_dir: str, max_device_adapters: int = 8,
                 max_cpu_adapters: int = 64, max_lora_rank: int = 64, max_adapter_bytes: int = 512 * 2**20,
                 max_archive_bytes: int = 1024 * 2**20, preload: Iterable[str] = (), events: Any = None,
                 reserved_names: Iterable[str] = (), hub_timeout: float = 10.0, max_merged_adapters: int = 8,
                 memory_budget: int = 0, single_memory: Optional[bool] = None, adapter_dtype: str = "auto",
                 step_gate: Any = None, loader_nice: int = 0, served_files: bool = True,
                 slot_wait_seconds: float = 30.0, max_slot_waiters: int = 64, slot_turn_seconds: float = 2.0):
        self.model = model
        self.adapter_dtype = AdapterDtype(adapter_dtype)      # how loads hold adapters (adapter_dtype.py)
        self.reserved = {n.casefold() for n in reserved_names if n}
        self.hub_timeout = hub_timeout
        self.engine_call = engine_call
        self.store = AdapterStore(adapter_dir)
        self.validator = AdapterValidator(model, max_lora_rank, max_adapter_bytes)
        self.max_device_adapters = max_device_adapters
        self.memory_budget = memory_budget or 2**62        # bytes of device-tier adapters (0: no byte limit)
        # on the CPU the device and cpu tiers are the same memory: an adapter in the model is not kept twice,
        # and one leaving the device goes back to the store (None: decided by the model's device)
        self.single_memory = _device_of(model).type == "cpu" if single_memory is None else single_memory
        self._model_lock = threading.Lock()     # model changes: the engine thread's, `_attach_now`'s, the evictor's
        background = functools.partial(_background_priority, loader_nice)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-load",   # reads and prepares loads
                                          initializer=background)
        self._loads_read = 0                    # on the loader thread: when to trim the heap (reads.py)
        self._engine_loads: set[asyncio.Future] = set()   # loads in flight on the engine thread (tiers.py)
        self._wrapped_targets: set[tuple] = set()        # targets whose layers were wrapped ahead (layer_wrap.py)
        # the engine's StepGate (service/engine/step_gate.py), or None: with it, evictions run on this thread
        # beside the step's C++ loop instead of between two steps (tiers.py, `_evict`)
        self.step_gate = step_gate
        self._evictor = (ThreadPoolExecutor(1, thread_name_prefix="adapter-evict", initializer=background)
                         if step_gate is not None else None)
        # on the CPU, each stored adapter's tensors as held are written beside it after its first load, and
        # later loads map them (store.read_served); this thread writes them
        self._saver = (ThreadPoolExecutor(1, thread_name_prefix="adapter-save", initializer=background)
                       if served_files and self.single_memory else None)
        self._map_ahead = MapAhead(self._saver is not None, background)   # served files of queued loads
        self.max_cpu_adapters = max_cpu_adapters
        self.max_archive_bytes = max_archive_bytes
        self.preload = list(preload)
        self.events = events
        self._records: dict[str, AdapterRecord] = {}
        self._retired: list[AdapterRecord] = []        # deleted / replaced, memory not yet freed
        self._merged: dict[tuple, AdapterRecord] = {}  # merge spec key -> merged adapter (merged.py)
        self.max_merged_adapters = max_merged_adapters
        self._generations = itertools.count(1)
        self._ticks = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._lock: Optional[asyncio.Lock] = None
        self._tasks: set[asyncio.Task] = set()
        self._slots = SlotWait(slot_wait_seconds, max_slot_waiters,     # requests waiting for a device slot
                               lambda: self._emit("slot_waiters_changed"), slot_turn_seconds, self._turns_changed)
        self.turn_seconds = slot_turn_seconds   # a wait this long makes an adapter yield its slot (turns.py)
        self._turns_due = False

    # ----- looking up ---------------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise NotFound(f"adapter {name!r} not found")
        return record

    def _usable(self, name: str) -> AdapterRecord:
        record = self.get(name)
        if record.quarantined:
            raise Conflict(f"adapter {name!r} is quarantined: {record.error}; replace or delete it, or put "
                           f"its files right and rescan")
        return record

    def list(self) -> list[AdapterRecord]:
        return [self._records[n] for n in sorted(self._records)]

    def tier_bytes(self) -> dict[str, int]:
        """Weight bytes of the adapters per tier: stored ones' files, the others' in memory (in adapter_dtype;
        deleted ones still held by requests included)."""
        sizes = {tier: 0 for tier in TIERS}
        for record in self._residents():
            sizes[record.tier] += record.size if record.tier == STORED else record.memory_size
        return sizes

    def tier_counts(self) -> dict[str, int]:
        """Adapters per tier, counting deleted ones whose memory is still held by running requests."""
        counts = {tier: 0 for tier in TIERS}
        for record in self._residents():
            counts[record.tier] += 1
        return counts

    # ----- serving -----------------------------------------------------------------------------------------
    async def acquire(self, name: str, wait: bool = False) -> Lease:
        """A lease on `name` in the device tier; NotFound, Conflict (deactivated) or Unavailable (no slot; with
        `wait`, only after waiting for one as `SlotWait` says: a caller holding no other lease)."""
        self._bind()
        started = time.monotonic()
        while True:
            record = self._usable(name)
            if not record.served:
                raise Conflict(f"adapter {name!r} is deactivated; activate it before sending requests")
            seen = self._slots.generation
            try:
                refusal = self._yield_refusal(record)       # on the device, yielding its slot (turns.py)
                if refusal is not None:
                    raise refusal
                lease = await self._lease_loaded(record)
            except Unavailable as refused:
                if not wait:
                    raise
                await self._slots.wait(refused, started, seen, self._a_change_may_help, name)
                continue
            if lease is not None:
                return lease

    @property
    def slot_waiters(self) -> int:
        """Requests waiting for a device slot now (`SlotWait`)."""
        return self._slots.waiting

    def slot_waiting_adapters(self) -> list[str]:
        """The adapters that requests wait for a device slot for now."""
        return list(self._slots.names)

    def _a_change_may_help(self) -> bool:
        """Whether some adapter in the device tier is in use and not pinned (its last release would free room or
        a module), or one is leaving the model (an eviction in flight) or yielding its slot (turns.py)."""
        return any((r.tier == DEVICE and r.in_use > 0 and not r.pinned) or r.pending is not None
                   or r.yielding_to is not None for r in self._residents())

    async def _lease_loaded(self, record: AdapterRecord) -> Optional[Lease]:
        """A lease on `record`, loading it to the device tier first; None when it was deleted, replaced or
        forgotten while loading (the caller looks its name up again)."""
        record.in_use += 1
        record.tick, record.last_used_at = next(self._ticks), time.time()
        if record.tier != DEVICE or record.pending is not None:     # (counted on the device while it loads)
            try:
                await self._shielded(self._locked(self._load_for_lease, record))
            except _Retry:
                self._unuse(record)
                return None
            except BaseException:
                self._unuse(record)
                raise
            if record.retired:
                self._unuse(record)
                return None
        record.requests_served += 1
        return Lease(record.name, record.model_name, record)

    def release(self, lease: Lease) -> None:
        """Give a lease back (idempotent; any thread)."""
        loop = self._loop
        if loop is not None and not loop.is_closed() and _running_loop() is not loop:
            loop.call_soon_threadsafe(self._release, lease)
            return
        self._release(lease)

    # ----- admin verbs -----------------------------------------------------------------------------------------
    async def activate(self, name: str) -> AdapterRecord:
        """Serve `name` again and load it to the device tier. A deactivate that comes in while it loads wins:
        the activation happened, and the record says what the adapter is now. With every device slot held
        by pinned or in-use adapters the activation stands and the adapter stays in its tier (its first
        request loads it, waiting for a slot as any request does); a load that fails otherwise undoes it."""
        self._bind()
        record = self._usable(name)
        activated = not record.served
        if activated:
            record.served = True
            self._save_meta(record)
        record.tick = next(self._ticks)
        try:
            await self._shielded(self._locked(self._load_live, record))
        except Unavailable:
            log.info("adapter %r activated; it loads at its first request (no device slot free now)", name)
        except Conflict:
            if activated and not record.served and not record.retired:   # quarantined by the load (or a
                self._save_meta(record)             # concurrent deactivate): the store says inactive again
            if record.served or record.error or record.retired:     # not a concurrent deactivate
                raise
        except BaseException:
            if activated and record.served and not record.retired:  # a failed request changes nothing
                record.served = False
                self._save_meta(record)
            raise
        return record

    async def deactivate(self, name: str) -> AdapterRecord:
        """Stop serving `name` (acquire raises Conflict) and free its memory once no request uses it."""
        self._bind()
        record = self._usable(name)
        if record.served:
            record.served = False
            self._save_meta(record)
            self._slots.changed()             # a request waiting for it hears now (409)
        if record.in_use == 0:
            await self._shielded(self._locked(self._unload, record))
        return record

    async def load(self, name: str) -> AdapterRecord:
        """Bring `name` to the device tier now, without a lease and without changing what the store says (a
        replica-local warm-up: Ray Serve's multiplexed loader). NotFound, Conflict (deactivated, quarantined),
        Unavailable (every device slot pinned or in use)."""
        self._bind()
        record = self._usable(name)
        if not record.served:
            raise Conflict(f"adapter {name!r} is deactivated; activate it before sending requests")
        record.tick = next(self._ticks)
        await self._shielded(self._locked(self._load_live, record))
        return record

    async def evict(self, name: str) -> bool:
        """Take `name` out of the device tier now, as LRU eviction would, unless it is pinned or a request uses
        it, without changing what the store says; the counterpart of `load`. Whether it left the device tier."""
        self._bind()
        record = self.get(name)
        return await self._shielded(self._locked(self._evict_one, record))

    async def pin(self, name: str, pinned: bool = True) -> AdapterRecord:
        """A pinned adapter is never evicted from the tier it reaches (it is not loaded by pinning)."""
        self._bind()
        record = self._usable(name)
        record.pinned = bool(pinned)
        self._save_meta(record)
        self._enforce_cpu_limit()
        return record

    async def delete(self, name: str) -> None:
        """Remove `name` now (404 from here on, files gone); its memory is freed at once, or at the last
        release when requests still use it."""
        self._bind()
        record = self.get(name)
        del self._records[name]
        trash = self.store.trash(name)
        self._emit("adapter_deleted", name)
        waits = [self._spawn(asyncio.to_thread(self.store.remove, trash))]
        freeing = self._retire(record)
        if freeing is not None:
            waits.append(freeing)
        await asyncio.shield(asyncio.gather(*waits))

    async def drain(self) -> None:
        """Wait for background work (frees after the last release, trash removal) to finish."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        """End the loader, evictor and saver threads (after `drain`, when nothing more will be loaded: a load
        after this fails; served files not yet begun are not written, a later load writes them). The app calls
        it when it stops; a registry never closed keeps them idle until exit."""
        for pool in (self._loader, self._evictor, self._saver):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=pool is self._saver)
        self._map_ahead.close()

    # ----- leases, retirement ----------------------------------------------------------------------------------
    def _release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        self._unuse(lease.record)

    def _unuse(self, record: AdapterRecord) -> None:
        record.in_use -= 1
        if record.in_use > 0:
            return
        self._enforce_cpu_limit()
        if _running_loop() is None:
            return
        if record.tier == DEVICE:
            self._slots.changed()             # its slot can be taken now (not after a refused attempt's unuse)
        if record.retired:
            self._free_later(record)
        elif not record.served and record.tier != STORED:
            self._spawn(self._locked(self._unload, record), background=True)

    def _retire(self, record: AdapterRecord) -> Optional[asyncio.Task]:
        self._retire_merged_of(record)         # merged adapters built from it go with it
        record.retired = True
        self._retired.append(record)
        if _running_loop() is not None:
            self._slots.changed()             # a request waiting for it looks its name up again
        return self._free_later(record) if record.in_use == 0 else None

    def _free_later(self, record: AdapterRecord) -> asyncio.Task:
        return self._spawn(self._locked(self._free, record), background=True)

    async def _free(self, record: AdapterRecord) -> None:
        """A retired adapter's last lease is gone: remove it from the model and drop its tensors (lock held)."""
        if record.in_use or record not in self._retired:
            return
        if record.tier == DEVICE:
            await self._unload_from_model(record)
        record.drop_tensors()
        record.tier = STORED
        self._retired.remove(record)
        self._slots.changed()                 # its slot is free

    # ----- plumbing --------------------------------------------------------------------------------------------
    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._tasks and self._loop is not None and not self._loop.is_closed():
                raise RuntimeError("the adapter registry is already used by another event loop")
            self._loop, self._lock = loop, asyncio.Lock()

    async def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        async with self._lock:
            return await fn(*args)

    def _spawn(self, coro, background: bool = False) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, background))
        return task

    def _task_done(self, task: asyncio.Task, background: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()            # retrieved even when the awaiting caller was cancelled
        if exc is not None and background:
            log.warning("adapter registry background task failed: %r", exc)

    async def _shielded(self, coro) -> Any:
        """Run `coro` as its own task: a cancelled caller stops waiting, the work still completes."""
        return await asyncio.shield(self._spawn(coro))

    async def _on_engine(self, fn: Callable[[], Any]) -> Any:
        """`fn` on the engine thread between two steps, holding the model lock (see `_attach_now`)."""
        def locked():
            with self._model_lock:
                return fn()
        return await asyncio.wrap_future(self.engine_call(locked))

    def _emit(self, event: str, *args: Any) -> None:
        hook = getattr(self.events, event, None)
        if callable(hook):
            try:
                hook(*args)
            except Exception:             # metrics must never break the registry
                log.exception("adapter registry event hook %s failed", event)


def _background_priority(nice: int) -> None:
    """A loader / evictor thread's initializer: `nice` added to its nice value (`loader_nice`; Linux sets it
    per thread), so that on a busy host the step's kernel threads come first. 0 (the default) leaves it: on
    the development machine nice 10 changed no step's speed measurably and made loads wait (p50 33 -> 39 ms)."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
    except (AttributeError, OSError):     # not Linux, or not allowed: the default priority
        pass


def _device_of(model) -> "torch.device":
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
