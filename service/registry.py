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
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import math
import os
import re
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Iterator, Optional

import adapters_core as ac
from adapters_core.io import SAFETENSORS_NAME

from .adapter_record import CPU, DEVICE, STORED, TIERS, AdapterRecord, Lease
from .adapter_store import AdapterStore
from .adapter_validation import (AdapterSummary, AdapterValidator, ValidatedAdapter, check_name, check_tensors,
                                 parse_config)
from .archive import archive_kind, extract_archive
from .hub import fetch_adapter
from .registry_errors import Conflict, Invalid, NotFound, RegistryError, TooLarge, Unavailable

log = logging.getLogger(__name__)

EngineCall = Callable[[Callable[[], Any]], Future]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class _Retry(Exception):
    """The record was deleted or replaced while a load waited; look the name up again."""


class AdapterRegistry:
    def __init__(self, model, engine_call: EngineCall, adapter_dir: str, max_device_adapters: int = 8,
                 max_cpu_adapters: int = 64, max_lora_rank: int = 64, max_adapter_bytes: int = 512 * 2**20,
                 max_archive_bytes: int = 1024 * 2**20, preload: Iterable[str] = (), events: Any = None,
                 reserved_names: Iterable[str] = (), hub_timeout: float = 10.0):
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
            record.in_use += 1
            record.tick, record.last_used_at = next(self._ticks), time.time()
            if record.tier != DEVICE:
                try:
                    await self._shielded(self._locked(self._load_for_lease, record))
                except _Retry:
                    self._unuse(record)
                    continue
                except BaseException:
                    self._unuse(record)
                    raise
                if record.retired:         # deleted or replaced while loading: serve what the name is now
                    self._unuse(record)
                    continue
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

    # ----- registration internals ----------------------------------------------------------------------------
    def _precheck(self, name: str, replace: bool) -> None:
        check_name(name)
        if name.casefold() in self.reserved:
            raise Conflict(f"adapter name {name!r} is reserved: it is the base model's id, so requests for it "
                           f"would reach the base model; choose another name")
        self._bind()
        if not replace and name in self._records:
            raise self._taken(name)

    @staticmethod
    def _taken(name: str) -> Conflict:
        return Conflict(f"adapter {name!r} already exists; delete it first or replace it")

    async def _register(self, name: str, source: dict, replace: bool,
                        stage: Callable[[str], Any]) -> AdapterRecord:
        return await self._shielded(self._build_and_commit(name, source, replace, stage))

    async def _build_and_commit(self, name: str, source: dict, replace: bool,
                                stage: Callable[[str], Any]) -> AdapterRecord:
        staging = self.store.new_staging()
        try:
            validated, meta = await asyncio.to_thread(self._prepare, staging, stage, source)
            record, trash = self._commit(name, staging, validated, meta, replace)
        except BaseException:
            await asyncio.to_thread(self.store.remove, staging)
            raise
        await asyncio.to_thread(self.store.remove, trash)
        return record

    def _prepare(self, staging: str, stage: Callable[[str], Any], source: dict) -> tuple[ValidatedAdapter, dict]:
        """Worker thread: write the files to `staging`, validate, normalise to safetensors, write metadata, seal."""
        stage(staging)
        validated = self.validator.validate(staging)
        if validated.weights_name != SAFETENSORS_NAME:
            self.store.to_safetensors(staging, validated.tensors)
        sha256, size = self.store.digest(staging)
        meta = {"source": source, "created_at": time.time(), "pinned": False, "served": True,
                "sha256": sha256, "size": size}
        self.store.write_meta(staging, meta)
        self.store.seal(staging)
        return validated, meta

    def _commit(self, name: str, staging: str, validated: ValidatedAdapter, meta: dict,
                replace: bool) -> tuple[AdapterRecord, Optional[str]]:
        """Event loop, no await: swap the folder and the record in one step; return the record and the
        replaced folder's trash path."""
        old = self._records.get(name)
        if old is not None and not replace:
            raise self._taken(name)
        record = self._record(name, validated.summary, meta, tier=CPU, config=validated.config,
                              tensors=validated.tensors)
        if not record.serialisable():                  # never hold a record the admin routes cannot show
            raise Invalid(f"adapter {name!r}: its description is not valid JSON (a non-finite number?)")
        trash = self.store.commit(name, staging)
        self._records[name] = record
        if old is not None:
            self._retire(old)
        self._enforce_cpu_limit()
        self._emit("adapter_uploaded", name)
        return record, trash

    def _record(self, name: str, summary: Optional[AdapterSummary], meta: dict, error: Optional[str] = None,
                **state: Any) -> AdapterRecord:
        """A record from a summary and `registry.json`; with `error` (or metadata that does not describe a
        record the admin routes can show) a quarantined one."""
        try:
            record = AdapterRecord(
                name=name, kind=summary.kind if summary else "unknown", rank=summary.rank if summary else None,
                alpha=summary.alpha if summary else None, targets=summary.targets if summary else [],
                virtual_tokens=summary.virtual_tokens if summary else None,
                size=int(meta.get("size") or 0), sha256=str(meta.get("sha256") or ""),
                source=dict(meta.get("source") or {}), created_at=_time(meta.get("created_at")),
                served=bool(meta.get("served", True)) and error is None, pinned=bool(meta.get("pinned", False)),
                generation=next(self._generations), tick=next(self._ticks), error=error, **state)
        except (TypeError, ValueError, OverflowError) as exc:
            record = None
            error = error or f"{self.store.path(name)}/registry.json does not describe an adapter: {exc}"
        if record is None or not record.serialisable():
            error = error or f"{self.store.path(name)}/registry.json holds values that are not valid JSON"
            record = AdapterRecord(name=name, kind="unknown", rank=None, alpha=None, targets=[], size=0, sha256="",
                                   source={}, created_at=time.time(), served=False, error=error,
                                   generation=next(self._generations), tick=next(self._ticks))
        if record.quarantined:
            log.warning("adapter store: %r is quarantined: %s", name, record.error)
        return record

    def _save_meta(self, record: AdapterRecord) -> None:
        meta = {"source": record.source, "created_at": record.created_at, "pinned": record.pinned,
                "served": record.served, "sha256": record.sha256, "size": record.size}
        self.store.write_meta(self.store.path(record.name), meta)

    async def _scan(self) -> list[AdapterRecord]:
        for name, summary, meta, error in await asyncio.to_thread(self._read_store):
            if name not in self._records:
                self._records[name] = self._record(name, summary, meta, error, tier=STORED)
        for name in self.preload:
            record = self._records.get(name)
            if record is None or not record.served or record.quarantined:
                log.warning("preload: adapter %r is %s", name, "not in the store" if record is None else "deactivated")
                continue
            try:
                await self._load(record)
            except (RegistryError, _Retry) as exc:
                log.warning("preload: adapter %r cannot be loaded: %s", name, exc)
        return self.list()

    async def _rescan(self) -> dict[str, list[str]]:
        # Registrations commit on the event loop without the lock, so one may land while the store is read
        # in the worker thread: only names whose record is the one seen before the read are changed here.
        before = dict(self._records)
        entries = await asyncio.to_thread(self._read_store, False)
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "updated": []}
        on_disk = set()
        for name, summary, meta, error in entries:
            on_disk.add(name)
            record = self._records.get(name)
            if record is None and name not in before:
                self._records[name] = self._record(name, summary, meta, error, tier=STORED)
                report["added"].append(name)
            elif record is None or record is not before.get(name):
                continue                               # deleted or replaced here meanwhile
            elif (record.sha256 != str(meta.get("sha256") or "") or (error is not None and error != record.error)
                  or (error is None and record.quarantined and record.kind == "unknown")):   # fixed on disk
                self._retire(self._records.pop(name))
                self._records[name] = self._record(name, summary, meta, error, tier=STORED)
                report["changed"].append(name)
            elif record.quarantined:
                continue
            elif (record.served, record.pinned) != (flags := (bool(meta.get("served", True)),
                                                              bool(meta.get("pinned", False)))):
                record.served, record.pinned = flags
                report["updated"].append(name)
                if not record.served and not record.in_use:
                    await self._unload(record)
        for name, record in before.items():
            if (name not in on_disk and self._records.get(name) is record
                    and not os.path.isdir(self.store.path(name))):
                del self._records[name]
                self._retire(record)
                self._emit("adapter_deleted", name)
                report["removed"].append(name)
        self._enforce_cpu_limit()
        if any(report.values()):
            log.info("adapter store rescan: %s", {k: v for k, v in report.items() if v})
        return report

    def _read_store(self, clean: bool = True) -> list[tuple[str, Optional[AdapterSummary], dict, Optional[str]]]:
        """Worker thread: clean leftovers (at start-up), then describe every complete folder as (name,
        summary, metadata, error); a folder that fails today's checks comes with its error (quarantined)."""
        removed = self.store.clean() if clean else []
        if removed:
            log.info("adapter store: removed leftovers of an interrupted write: %s", removed)
        entries = []
        for name in self.store.names():
            folder = self.store.path(name)
            meta = None
            try:
                check_name(name)
                meta = self.store.read_meta(folder)
                if meta is None:          # a PEFT folder copied in by hand: check it like an upload
                    summary = self.validator.validate(folder).summary
                    meta = {"source": {"type": "local", "path": folder}, "created_at": time.time(),
                            "pinned": False, "served": True}
                else:
                    summary = AdapterSummary.of(parse_config(self.store.read_config(folder)))
                if not meta.get("sha256") or meta.get("size") != self.store.size(folder):
                    meta["sha256"], meta["size"] = self.store.digest(folder)
                    self.store.write_meta(folder, meta)
            except (RegistryError, OSError, ValueError, TypeError) as exc:
                entries.append((name, None, meta if isinstance(meta, dict) else {}, f"cannot be loaded: {exc}"))
                continue
            entries.append((name, summary, meta, None))
        return entries

    # ----- tiers --------------------------------------------------------------------------------------------
    def _residents(self) -> Iterator[AdapterRecord]:
        return itertools.chain(self._records.values(), self._retired)

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
        if record.retired:
            self._free_later(record)
        elif not record.served and record.tier != STORED:
            self._spawn(self._locked(self._unload, record), background=True)

    def _retire(self, record: AdapterRecord) -> Optional[asyncio.Task]:
        record.retired = True
        self._retired.append(record)
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


def _time(value: Any) -> float:
    """A stored unix time, or now when it is missing or not a finite number."""
    value = float(value or 0)
    return value if math.isfinite(value) and value > 0 else time.time()


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
