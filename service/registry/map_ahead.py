"""`MapAhead`: served files mapped and filled on threads of their own, for loads about to wait for them.

A load whose served file is not wholly in the page cache (a server's first requests after a reboot, or pages the
kernel reclaimed) has it mapped and filled here (`filled`: `packed_file.premap`, the disk read with the GIL
released), taken back ahead of the event loop's queued work, and is then read on the loop
(`reads.py`'s `_read_inline`, as loads of cached files are). Loads the loader thread reads (a first load from the PEFT
file; files over the inline bound) queue there, and one that will wait behind another has its file mapped and
filled here meanwhile (`start`), the loader's read taking that mapping (`packed_file.map_packed`'s `ahead`); a
loader load with nothing ahead of it is read at once and not mapped here (both threads would only map the same
file). Off where served files are off (the setting, a GPU's two tiers) or this system lacks the calls
(`packed_file.can_premap`).
"""

from __future__ import annotations

import functools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

from adapters_core.packed_file import Premapped, can_premap, premap

from service.loop_first import run_first

# Threads that map and fill served files. Each fill is mostly a disk read with the GIL released, and the thread then
# needs the GIL back for a moment (waiting up to the 5 ms switch interval beside a busy event loop): with 16 loads of
# files missing 3 pages each (reclaimed by the kernel), one thread ended the burst's loads p50 35-47 ms, four 16-18
# ms (BENCHMARKS.md, forty-third session), the reads and the waits overlapping.
MAP_THREADS = 4


class MapAhead:
    def __init__(self, enabled: bool, initializer: Optional[Callable[[], None]] = None):
        self._pool = (ThreadPoolExecutor(MAP_THREADS, thread_name_prefix="adapter-map", initializer=initializer)
                      if enabled and can_premap() else None)
        self.queued = 0             # jobs submitted to the loader and not yet taken back (event loop)
        self.started = 0            # premaps begun (the tests read it)

    def start(self, path: str) -> Optional[Future]:
        """Event loop, for a load about to be queued on the loader: a future of `premap(path)` when the loader
        has work ahead of it, else None."""
        if self._pool is None or not self.queued:
            return None
        try:
            future = self._pool.submit(premap, path)
        except RuntimeError:        # closed: the reader maps it itself
            return None
        self.started += 1
        return future

    async def filled(self, path: str) -> Optional[Premapped]:
        """Event loop: `premap(path)` on these threads, taken back ahead of the loop's queued callbacks
        (`run_first`: a burst's request intakes would otherwise run first); None where there are none (or they
        are closed) or the file cannot be mapped."""
        if self._pool is None:
            return None
        self.started += 1
        try:
            return await run_first(self._pool, functools.partial(premap, path))
        except (OSError, RuntimeError):
            return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
