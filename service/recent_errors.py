"""`RecentErrors`: the last few failures the service answered, for the operator console's live view.

Two kinds of entry land here: every HTTP response with a 4xx or 5xx status (recorded by the outermost
middleware, `api/request_id.py`, with the message of its OpenAI-shaped body and the request's id), and every
request that failed inside the engine after its stream had started (recorded by `TextGenerator` through
`Metrics.generation_failed`; the client saw a 200 and an error finish reason, so no status tells of it). The
log is a bounded ring (`max_entries`), thread-safe, newest last; nothing in it is ever written to disk, and its
messages are the ones the client already received (truncated and control characters escaped by
`api/errors.py`), so it shows nothing a caller was not told.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Optional

MAX_ENTRIES = 50


class RecentErrors:
    def __init__(self, max_entries: int = MAX_ENTRIES):
        self._entries: deque[dict[str, Any]] = deque(maxlen=max_entries)
        self._lock = threading.Lock()
        self.total = 0                          # entries ever added (the ring keeps the last max_entries)

    def add(self, status: Optional[int], message: str, method: str = "", path: str = "",
            request_id: Optional[str] = None) -> None:
        """One failure: `status` None for a generation that failed inside a 200 response."""
        entry = {"time": time.time(), "status": status, "method": method, "path": path,
                 "message": message, "request_id": request_id}
        with self._lock:
            self._entries.append(entry)
            self.total += 1

    def latest(self, n: int = 20) -> list[dict[str, Any]]:
        """The last `n` entries, newest first."""
        with self._lock:
            return list(reversed(self._entries))[:n]
