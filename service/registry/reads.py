"""Reads of stored adapters for loads (`ReadMixin` of `AdapterRegistry`, registry.py): where a load's files are read
(on the event loop, on the map threads and then the loop, or on the registry's one loader thread), and the read
itself: the stored config and tensors, packed and checked, mapped from a served file where there is one, the
adapter prepared for `attach_prepared`. `tiers.py`'s loads call them; the mixin uses the registry's state and
plumbing (the store, the saver, the map-ahead threads, the loader, events)."""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future
from typing import Optional, Union

import adapters_core as ac
from adapters_core import held_io
from adapters_core.io import SAFETENSORS_NAME
from adapters_core.packed_file import Premapped, map_resident
from adapters_core.packing import pack_adapter_tensors, tensor_bytes, trim_heap
from adapters_core.prepared import PreparedAdapter, prepare_adapter

from service.loop_first import run_first

from .base_copies import is_base_copy, serving_config, split_base_copies, without_base_copies
from .record import AdapterRecord
from .validation import parse_config

# Loads between two trims of the C heap (`packing.trim_heap`). A trim after every load returned each evicted
# adapter's pages to the OS, so the next load faulted fresh ones in (~1 ms per 4 MB, in the loader's CPU
# beside the step); between trims a load reuses the holes evictions left. Measured at K=1,000 (64 streams,
# 2 cores): the loader's CPU per load p50 9.8 -> 8.8 ms; 128 resident adapters still take 1.05x their weight
# bytes, and at most TRIM_EVERY - 1 evictions' holes (~28 MB of 4 MB adapters) wait for the next trim.
TRIM_EVERY = 8

# A load whose served file (CPU: the adapter mapped in its serving layout) is at most this large and wholly in the
# page cache is read on the event loop where its request is taken in (`_read_inline`: ~1.5 ms for a 4 MiB SmolLM2
# adapter on q/v), not handed to the loader thread. The hand-over cost more than the read: in a burst of requests
# the loop and the loader each gave the GIL up at every system call and waited up to the 5 ms switch interval to
# take it back, so the loader read about one adapter per interval, and a K=16 start burst's 16 loads ended after
# 30-60 ms (p50) instead of ~2.5 (BENCHMARKS.md, forty-third session). A file with pages to read from disk is
# filled on the map threads first (`map_ahead.py`); larger files (the fill and the views of hundreds of tensors)
# and first loads (the PEFT file read, checked and converted) stay on the loader thread.
INLINE_READ_BYTES = 32 << 20


def _inline_size(path: str) -> bool:
    """Whether the file at `path` is there and at most INLINE_READ_BYTES (so its load is read on the event loop once
    its pages are in memory)."""
    try:
        identity = held_io.stat_identity(path)
    except NotImplementedError:
        return False
    return identity is not None and 0 < identity[2] <= INLINE_READ_BYTES


# a read's result: the stored config, the tensors as held, the adapter prepared (or None), the bytes the cast added
_Read = tuple[ac.AdapterConfig, dict, Optional[PreparedAdapter], int]


class _Retry(Exception):
    """The record was deleted or replaced while a load waited; look the name up again."""


class ReadMixin:
    """Where and how `AdapterRegistry`'s loads read their files (see the module docstring)."""

    async def _read_for_load(self, record: AdapterRecord) -> _Read:
        """Event loop, the registry lock held (released while it waits): `record`'s stored files read for a load.
        Its served file read here when it is cached (`_read_inline`), else filled on the map threads and then read
        here (`_read_after_fill`), else (a first load, a larger file, served files off) read on the loader thread,
        the served file mapped ahead meanwhile when other loads are ahead of it there (`map_ahead.py`)."""
        served = self.store.served_path(self.store.path(record.name), self.adapter_dtype.factor_dtype)
        read = self._read_inline(record.name, record.model_name, served)
        if read is None and self._saver is not None and _inline_size(served):
            read = await self._read_after_fill(record, served)
        if read is None:
            read = await self._unlocked(self._in_loader(record.name, self._read_stored, record.name,
                                                        record.model_name, self._map_ahead.start(served)))
        return read

    def _read_inline(self, name: str, model_name: str, served: str, mapped: Optional[Premapped] = None,
                     filled: float = 0.0) -> Optional[_Read]:
        """Event loop: `_read_stored`'s result for a load whose served file (at `served`) is at most INLINE_READ_BYTES
        and wholly in the page cache (or `mapped` and filled already, which took `filled` seconds), read here; None
        otherwise (no served file yet, served files off, a page to read from disk, a larger file, or the file found
        stale): the caller has it filled on the map threads, or the loader thread reads it."""
        if self._saver is None:
            return None
        began = time.perf_counter()
        if mapped is None:
            mapped = map_resident(served, INLINE_READ_BYTES)
        if mapped is None:
            return None
        read = self._read_stored(name, model_name, mapped, served_only=True)
        if read is not None:
            self._emit("adapter_read", name, filled, time.perf_counter() - began, 0.0)
        return read

    async def _read_after_fill(self, record: AdapterRecord, served: str) -> Optional[_Read]:
        """Event loop: `record`'s served file mapped and filled on the map threads (`MapAhead.filled`: a disk read
        with the GIL released), then read here (`_read_inline`); None when there are no such threads or the file
        could not be mapped (the loader thread then reads the stored files). A few pages of a cached file reclaimed
        by the kernel sent the whole load to the loader thread's queue before (a K=16 start burst's loads p50 <= 40
        ms)."""
        began = time.perf_counter()
        mapped = await self._unlocked(self._map_ahead.filled(served))
        if mapped is None:
            return None
        if record.retired:
            raise _Retry()
        return self._read_inline(record.name, record.model_name, served, mapped, time.perf_counter() - began)

    def _read_stored(self, name: str, model_name: str, ahead: Union[Future, Premapped, None] = None,
                     served_only: bool = False) -> Optional[_Read]:
        """Worker thread (or the event loop, `_read_inline`): the stored config and tensors, packed as the stacks
        read them (factors in adapter_dtype) and checked, the adapter prepared for `attach_prepared` where that path
        applies (else None: the engine thread loads it the general way), and the bytes the cast added (negative:
        saved). With served files (CPU), the tensors are mapped from the one an earlier read of the same stored
        file left (checked then; `ahead`: that file mapped already, or ahead on another thread, `map_ahead.py`); a
        read of the PEFT file hands its result to the saver thread to write that file. `served_only`: None instead
        of reading the PEFT file when there is no served file to map."""
        folder = self.store.path(name)
        config = serving_config(parse_config(self.store.read_config(folder)))
        factor_dtype = self.adapter_dtype.factor_dtype
        served = self.store.read_served(folder, factor_dtype, ahead) if self._saver is not None else None
        if served is None and served_only:
            return None
        source = self.store.source(folder) if self._saver is not None and served is None else None
        # the file's copies of base weights were checked equal to the served ones at registration: not read
        skip = functools.partial(is_base_copy, config)
        packed = None if served is not None else self.store.read_packed(folder, factor_dtype, skip)
        if served is not None:                                  # mapped as checked and held at an earlier load
            tensors = without_base_copies(config, served[0])             # (files of older versions hold some)
            extra = tensor_bytes(tensors) - served[1]
        elif packed is not None:
            tensors, extra = self.adapter_dtype.hold_packed(*packed, lambda: self.store.read_tensors(folder),
                                                            SAFETENSORS_NAME)    # (checked as read)
            if source is not None:                              # later loads map them (store.read_served)
                try:
                    self._saver.submit(self.store.write_served, folder, factor_dtype, tensors, packed[1], source)
                except RuntimeError:                            # closed: a later load writes it
                    pass
        else:
            tensors, copies = split_base_copies(config, self.store.read_tensors(folder))
            tensors, extra = self.adapter_dtype.hold(tensors, SAFETENSORS_NAME, pack=True)
            extra -= tensor_bytes(copies)
        prepared = self._prepare_load(config, tensors, model_name, packed=True)
        self._loads_read += 1
        if self._loads_read % TRIM_EVERY == 0:
            trim_heap()                   # freed buffers back to the OS, every TRIM_EVERY loads (see there)
        return (config,) + prepared + (extra,)

    def _prepare_load(self, config, tensors: dict, model_name: str,
                      packed: bool = False) -> tuple[dict, Optional[PreparedAdapter]]:
        """Worker thread: the tensors packed as the stacks read them, and the prepared adapter (or None)."""
        factor_dtype = self.adapter_dtype.factor_dtype
        if not packed:
            tensors = pack_adapter_tensors(tensors, factor_dtype)
        try:
            prepared = prepare_adapter(self.model, config, tensors, model_name, factor_dtype)
        except ac.AdapterError:
            prepared = None               # the general path raises it again, with its own rollback
        return tensors, prepared

    async def _in_loader(self, name: str, fn, *args):
        """`fn(*args)` for adapter `name` on the registry's one loader thread: loads are prepared one at a
        time, so they never take more than one core from the engine (with the default executor's six threads and
        the finiteness check per tensor, 64 streams over 1,000 adapters served 276 tokens/s; one thread and one
        check per packed buffer: 316, with ~8 loads a second). Reports how long it waited for the thread (the
        loads before it), how long the thread took, and how long the finished work then waited for this event loop
        to take it back (`adapter_read`: in a burst of cold loads the loop is busy with the requests' intake and
        shares the one GIL with the loader, and this wait was most of a load: BENCHMARKS.md, thirty-eighth
        session; the result now goes ahead of the callbacks queued there, `loop_first.run_first`)."""
        queued, times = time.perf_counter(), []
        self._map_ahead.queued += 1

        def timed():
            began = time.perf_counter()
            try:
                return fn(*args)
            finally:
                times.extend((began, time.perf_counter()))
        try:
            return await run_first(self._loader, timed)
        finally:
            self._map_ahead.queued -= 1
            if times:
                self._emit("adapter_read", name, times[0] - queued, times[1] - times[0],
                           max(time.perf_counter() - times[1], 0.0))
