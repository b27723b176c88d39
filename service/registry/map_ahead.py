"""`MapAhead`: the served files of loads queued behind the loader mapped ahead on a thread of their own.

A burst of cold loads whose served files are not all in the page cache (a server's first requests after a
reboot, naming 16 adapters at once; loads of cached ones are read on the event loop, `TierMixin._read_inline`)
queues them on the registry's one loader thread, which reads them in turn; each read maps its served file and
fills the mapping's page tables (the disk read, with the GIL released) before its Python part. Here a load that will wait behind another has its file mapped and filled by
this thread meanwhile (`packed_file.premap`, the GIL released: the kernel's work beside the loader's Python on the
other core, a disk read beside the reads ahead of it), and the loader's read takes that mapping
(`packed_file.map_packed`'s `ahead`). A load with nothing ahead of it is read at once and not mapped here (both
threads would only map the same file). Off where served files are off (the setting, a GPU's two tiers) or this
system lacks the calls (`packed_file.can_premap`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional

from adapters_core.packed_file import can_premap, premap


class MapAhead:
    def __init__(self, enabled: bool, initializer: Optional[Callable[[], None]] = None):
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="adapter-map", initializer=initializer)
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
        except RuntimeError:        # closed: the loader maps it itself
            return None
        self.started += 1
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
