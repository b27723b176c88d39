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
adapter_validation.py). Names equal to the base model's id (`reserved_names`, compared case-insensitively)
are refused with 409, route words with 422 (`check_name`). A stored adapter that fails today's checks at
start-up (or when it is read to be loaded) is kept as a *quarantined* record: listed with its error, refused
with 409 by acquire / activate / deactivate / pin, and gone once it is deleted or replaced.
This module has the public verbs, look-ups and plumbing; the registration internals are in
registry_registration.py, the tier and lease internals in registry_tiers.py and LoRAX's merged adapters
(`acquire_merged`) in registry_merged.py (mixins of the one class).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Optional

from adapters_core.io import SAFETENSORS_NAME

from .adapter_record import DEVICE, TIERS, AdapterRecord, Lease
from .adapter_store import AdapterStore
from .adapter_validation import AdapterValidator
from .archive import archive_kind, extract_archive
from .hub import fetch_adapter
from .registry_errors import Conflict, Invalid, NotFound, TooLarge
from .registry_merged import MergedMixin
from .registry_registration import RegistrationMixin
from .registry_tiers import TierMixin, _Retry, _running_loop

log = logging.getLogger(__name__)

EngineCall = Callable[[Callable[[], Any]], Future]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class AdapterRegistry(RegistrationMixin, TierMixin, MergedMixin):
    def __init__(self, model, engine_call: EngineCall, adapter_dir: str, max_device_adapters: int = 8,
                 max_cpu_adapters: int = 64, max_lora_rank: int = 64, max_adapter_bytes: int = 512 * 2**20,
                 max_archive_bytes: int = 1024 * 2**20, preload: Iterable[str] = (), events: Any = None,
                 reserved_names: Iterable[str] = (), hub_timeout: float = 10.0, max_merged_adapters: int = 8):
        self.model = model
        self.reserved = {n.casefold() for n in reserved_names if n}
        self.hub_timeout = hub_timeout
        self.engine_call = engine_call
        self.store = AdapterStore(adapter_dir)
        self.validator = AdapterValidator(model, max_lora_rank, max_adapter_bytes)
        self.max_device_adapters = max_device_adapters
        self.max_cpu_adapters = max_cpu_adapters
        self.max_archive_bytes = max_archive_bytes
        self.preload = list(preload)
        self.events = events
        self._records: dict[str, AdapterRecord] = {}
        self._retired: list[AdapterRecord] = []        # deleted / replaced, memory not yet freed
        self._merged: dict[tuple, AdapterRecord] = {}  # merge spec key -> merged adapter (registry_merged.py)
        self.max_merged_adapters = max_merged_adapters
        self._generations = itertools.count(1)
        self._ticks = itertools.count(1)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._lock: Optional[asyncio.Lock] = None
        self._tasks: set[asyncio.Task] = set()

    # ----- looking up ---------------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterRecord:
        record = self._records.get(name)
        if record is None:
            raise NotFound(f"adapter {name!r} not found")
        return record

    def _usable(self, name: str) -> AdapterRecord:
        record = self.get(name)
        if record.quarantined:
            raise Conflict(f"adapter {name!r} is quarantined: {record.error}; replace or delete it")
        return record

    def list(self) -> list[AdapterRecord]:
        return [self._records[n] for n in sorted(self._records)]

    def tier_counts(self) -> dict[str, int]:
        """Adapters per tier, counting deleted ones whose memory is still held by running requests."""
        counts = {tier: 0 for tier in TIERS}
        for record in self._residents():
            counts[record.tier] += 1
        return counts

    # ----- registering ----------------------------------------------------------------------------------------
    async def register_files(self, name: str, config_bytes: bytes, weights_bytes: bytes,
                             weights_filename: str = SAFETENSORS_NAME, replace: bool = False) -> AdapterRecord:
        """Register an uploaded `adapter_config.json` and weights file (.safetensors, or .bin loaded safely)."""
        self._precheck(name, replace)
        self.validator.check_size(len(config_bytes) + len(weights_bytes))
        limit = self.validator.max_adapter_bytes
        return await self._register(name, {"type": "upload"}, replace, lambda staging: self.store.stage_bytes(
            staging, config_bytes, weights_bytes, weights_filename, limit))

    async def register_archive(self, name: str, data: bytes, filename: str, replace: bool = False) -> AdapterRecord:
        """Register a PEFT folder uploaded as a .zip / .tar.gz / .tgz archive (checked before extraction)."""
        self._precheck(name, replace)
        if len(data) > self.max_archive_bytes:
            raise TooLarge(f"the archive is {len(data)} bytes; the limit is {self.max_archive_bytes} "
                           f"(max_archive_bytes)")
        archive_kind(filename)
        return await self._register(name, {"type": "upload", "filename": os.path.basename(filename)}, replace,
                                    lambda staging: extract_archive(data, filename, staging, self.max_archive_bytes,
                                                                    self.validator.max_adapter_bytes))

    async def register_path(self, name: str, path: str, replace: bool = False) -> AdapterRecord:
        """Copy a local PEFT folder into the store and register it."""
        self._precheck(name, replace)
        path = os.path.abspath(path)
        limit = self.validator.max_adapter_bytes
        return await self._register(name, {"type": "local", "path": path}, replace,
                                    lambda staging: self.store.stage_folder(staging, path, limit))

    async def register_hub(self, name: str, repo_id: str, revision: Optional[str] = None,
                           replace: bool = False) -> AdapterRecord:
        """Fetch a PEFT adapter from the Hugging Face hub (or its local cache) and register it."""
        self._precheck(name, replace)
        if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or os.path.exists(repo_id):
            raise Invalid(f"{repo_id!r} is not a hub repo id such as 'owner/name' (use a local source for folders)")
        source: dict[str, Any] = {"type": "hub", "repo_id": repo_id, "revision": revision}
        limit = self.validator.max_adapter_bytes
        folder = await fetch_adapter(repo_id, revision, self.hub_timeout)     # 404 / 503 within hub_timeout
        commit = os.path.basename(os.path.normpath(folder))
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            source["commit"] = commit
        return await self._register(name, source, replace,
                                    lambda staging: self.store.stage_folder(staging, folder, limit))

    async def scan(self) -> list[AdapterRecord]:
        """Start-up: remove leftovers of a crash, register every stored adapter (tier stored), then load
        the `preload` names to the device tier."""
        self._bind()
        return await self._shielded(self._locked(self._scan))

    async def rescan(self) -> dict[str, list[str]]:
        """Bring the registry in line with the store as other replicas sharing it left it: register folders
        it does not know (tier stored), forget names whose folder is gone (freed at their last release, as a
        delete), reload a name whose weights changed (a replace elsewhere), and take `served` / `pinned` from
        each folder's metadata. Temp folders are left alone: another replica may be writing one right now.
        Returns the names added, removed, changed and updated."""
        self._bind()
        return await self._shielded(self._locked(self._rescan))

    # ----- serving -----------------------------------------------------------------------------------------
    async def acquire(self, name: str) -> Lease:
        """A lease on `name` in the device tier; NotFound, Conflict (deactivated) or Unavailable (no slot)."""
        self._bind()
        while True:
            record = self._usable(name)
            if not record.served:
                raise Conflict(f"adapter {name!r} is deactivated; activate it before sending requests")
            lease = await self._lease_loaded(record)
            if lease is not None:
                return lease

    async def _lease_loaded(self, record: AdapterRecord) -> Optional[Lease]:
        """A lease on `record`, loading it to the device tier first; None when it was deleted, replaced or
        forgotten while loading (the caller looks its name up again)."""
        record.in_use += 1
        record.tick, record.last_used_at = next(self._ticks), time.time()
        if record.tier != DEVICE:
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
        """Serve `name` again and load it to the device tier."""
        self._bind()
        record = self._usable(name)
        if not record.served:
            record.served = True
            self._save_meta(record)
        record.tick = next(self._ticks)
        await self._shielded(self._locked(self._load_live, record))
        return record

    async def deactivate(self, name: str) -> AdapterRecord:
        """Stop serving `name` (acquire raises Conflict) and free its memory once no request uses it."""
        self._bind()
        record = self._usable(name)
        if record.served:
            record.served = False
            self._save_meta(record)
        if record.in_use == 0:
            await self._shielded(self._locked(self._unload, record))
        return record

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
        return await asyncio.wrap_future(self.engine_call(fn))

    def _emit(self, event: str, *args: Any) -> None:
        hook = getattr(self.events, event, None)
        if callable(hook):
            try:
                hook(*args)
            except Exception:             # metrics must never break the registry
                log.exception("adapter registry event hook %s failed", event)

