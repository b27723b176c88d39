"""Registration and store scans (`RegistrationMixin` of `AdapterRegistry`, registry.py): the public
`register_files` / `register_archive` / `register_path` / `register_hub`, `scan` and `rescan`. A registration is
prechecked (name, replace), staged and validated in a worker thread, committed to the store and recorded;
start-up scans and rescans read the store back into records, quarantining what fails today's checks. The mixin
uses the registry's state (records, store, lock, engine calls) and its plumbing."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from typing import Any, Callable, Optional

from adapters_core.io import SAFETENSORS_NAME

from .adapter_dtype import held_dtype
from .archive import archive_kind, extract_archive
from .errors import Conflict, Invalid, RegistryError, TooLarge
from .hub import fetch_adapter
from .layer_wrap import wrap_key, wrap_layers
from .record import CPU, STORED, AdapterRecord
from .tiers import _Retry
from .validation import AdapterSummary, ValidatedAdapter, check_name, parse_config

log = logging.getLogger("service.registry")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class RegistrationMixin:
    """Registration, scans and records for `AdapterRegistry` (whose state and plumbing it uses)."""

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
            validated, meta, extra, config_sha256 = await asyncio.to_thread(self._prepare, staging, stage, source)
            record, trash = self._commit(name, staging, validated, meta, replace, extra, config_sha256)
        except BaseException:
            await asyncio.to_thread(self.store.remove, staging)
            raise
        await asyncio.to_thread(self.store.remove, trash)
        await self._wrap_targets([validated.config])
        return record

    def _prepare(self, staging: str, stage: Callable[[str], Any],
                 source: dict) -> tuple[ValidatedAdapter, dict, int, str]:
        """Worker thread: write the files to `staging`, validate, normalise to safetensors, write metadata, seal;
        the tensors the record holds are then cast to adapter_dtype (the files stay as uploaded), which changes
        their bytes by the returned amount (negative: saved). Also returns the staged config's sha256."""
        stage(staging)
        validated = self.validator.validate(staging)
        if validated.weights_name != SAFETENSORS_NAME:
            self.store.to_safetensors(staging, validated.tensors)
        validated.tensors, extra = self.adapter_dtype.hold(validated.tensors, validated.weights_name, pack=False)
        extra -= validated.base_copy_bytes         # stored, never held
        meta = {"source": source, "created_at": time.time(), "pinned": False, "served": True,
                **self.store.digest(staging)}
        self.store.write_meta(staging, meta)
        self.store.seal(staging)
        return validated, meta, extra, self.store.config_digest(self.store.read_config(staging))

    def _commit(self, name: str, staging: str, validated: ValidatedAdapter, meta: dict, replace: bool,
                extra: int = 0, config_sha256: str = "") -> tuple[AdapterRecord, Optional[str]]:
        """Event loop, no await: swap the folder and the record in one step; return the record and the
        replaced folder's trash path."""
        old = self._records.get(name)
        if old is not None and not replace:
            raise self._taken(name)
        record = self._record(name, validated.summary, meta, tier=CPU, config=validated.config,
                              tensors=validated.tensors, dtype=held_dtype(validated.tensors),
                              resident_size=int(meta["size"]) + extra, config_sha256=config_sha256)
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
                weights_file=str(meta.get("weights_file") or ""), source=dict(meta.get("source") or {}),
                created_at=_time(meta.get("created_at")),
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
                "served": record.served, "sha256": record.sha256, "size": record.size,
                "weights_file": record.weights_file}
        self.store.write_meta(self.store.path(record.name), meta)

    async def _scan(self) -> list[AdapterRecord]:
        configs = []
        for name, summary, meta, error, config, config_sha256 in await asyncio.to_thread(self._read_store):
            if name not in self._records:
                self._records[name] = self._record(name, summary, meta, error, tier=STORED,
                                                   config_sha256=config_sha256)
                if self._records[name].served:
                    configs.append(config)
        await self._wrap_targets(configs)
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
        entries = await asyncio.to_thread(self._read_store, False, before)
        report: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "updated": []}
        on_disk, configs = set(), []
        for name, summary, meta, error, config, config_sha256 in entries:
            on_disk.add(name)
            record = self._records.get(name)
            if record is None and name not in before:
                self._records[name] = self._record(name, summary, meta, error, tier=STORED,
                                                   config_sha256=config_sha256)
                report["added"].append(name)
                configs.append(config)
            elif record is None or record is not before.get(name):
                continue                               # deleted or replaced here meanwhile
            elif (record.sha256 != str(meta.get("sha256") or "") or record.config_sha256 != config_sha256
                  or (error is not None and error != record.error)
                  or (error is None and record.quarantined and record.kind == "unknown")):   # fixed on disk
                self._retire(self._records.pop(name))
                self._records[name] = self._record(name, summary, meta, error, tier=STORED,
                                                   config_sha256=config_sha256)
                report["changed"].append(name)
                configs.append(config)
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
        await self._wrap_targets(configs)
        return report

    async def _wrap_targets(self, configs: list) -> None:
        """Wrap the layers these adapters' configs target ahead of their first loads (`layer_wrap.py`): once per
        distinct set of targets, in one engine call. Only an optimisation: a failure is logged, and the loads
        wrap what they need as before."""
        todo = {}
        for config in configs:
            key = None if config is None else wrap_key(config)
            if key is not None and key not in self._wrapped_targets:
                todo.setdefault(key, config)
        if not todo:
            return
        self._wrapped_targets.update(todo)
        try:
            count = await self._on_engine(lambda: wrap_layers(self.model, list(todo.values())))
        except Exception:
            log.exception("wrapping the layers of stored adapters ahead of their loads failed")
            return
        if count:
            log.info("wrapped %d layers that stored adapters target, ahead of their loads", count)

    def _read_store(self, clean: bool = True, known: Optional[dict[str, AdapterRecord]] = None
                    ) -> list[tuple[str, Optional[AdapterSummary], dict, Optional[str], Any, str]]:
        """Worker thread: clean leftovers (at start-up), then describe every complete folder as (name,
        summary, metadata, error, config, the config's sha256); a folder that fails today's checks comes with
        its error (quarantined) and no config. The weights file is hashed again only when its identity is not
        the one its recorded sha256 was taken from (`known`: the records a rescan has, whose own identities
        count too, so a store this replica cannot write is not hashed at every rescan)."""
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
                    validated = self.validator.validate(folder)
                    config, summary = validated.config, validated.summary
                    meta = {"source": {"type": "local", "path": folder}, "created_at": time.time(),
                            "pinned": False, "served": True}
                    config_bytes = self.store.read_config(folder)
                else:
                    config_bytes = self.store.read_config(folder)
                    config = parse_config(config_bytes)
                    summary = AdapterSummary.of(config)
                self._describe_files(name, folder, meta, (known or {}).get(name))
            except (RegistryError, OSError, ValueError, TypeError) as exc:
                entries.append((name, None, meta if isinstance(meta, dict) else {}, f"cannot be loaded: {exc}",
                                None, ""))
                continue
            entries.append((name, summary, meta, None, config, self.store.config_digest(config_bytes)))
        return entries

    def _describe_files(self, name: str, folder: str, meta: dict, record: Optional[AdapterRecord]) -> None:
        """Worker thread: bring `meta`'s sha256, size and weights-file identity up to date with the folder's
        files, hashing the weights only when that identity changed, and write it back (a store this replica
        cannot write keeps the new values in memory: the record's). Metadata from before identities were kept
        is trusted as it was then (by its size) unless this replica's record says the file changed; its
        identity is kept in memory only (written with the record's next metadata change), so a start-up after
        the upgrade does not rewrite every folder's metadata under replicas that may be pinning meanwhile."""
        identity, size = self.store.weights_identity(folder), self.store.size(folder)
        recorded, digested = meta.get("weights_file"), bool(meta.get("sha256")) and meta.get("size") == size
        if digested and recorded == identity:
            return
        if record is not None and record.sha256 and record.weights_file == identity and record.size == size:
            meta.update(sha256=record.sha256, size=size, weights_file=identity)      # hashed here before
            return
        if digested and recorded is None and record is None:
            meta["weights_file"] = identity
            return
        meta.update(self.store.digest(folder))
        try:
            self.store.write_meta(folder, meta)
        except OSError as exc:
            log.info("adapter store: %r's registry.json not updated (%s); its digest is kept in memory", name, exc)


def _time(value: Any) -> float:
    """A stored unix time, or now when it is missing or not a finite number."""
    value = float(value or 0)
    return value if math.isfinite(value) and value > 0 else time.time()
