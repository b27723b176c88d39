"""`GracefulServer`: uvicorn's server with the shutdown a load balancer expects.

On SIGTERM (or SIGINT) `/ready` answers 503 at once, while the listener still accepts, so a balancer stops
sending traffic; `shutdown_delay` seconds later the listener closes and uvicorn waits for the open requests,
which the engine keeps stepping (it drains, it does not drop). Whatever still runs `shutdown_timeout` seconds
after the signal is cancelled in the engine, so those responses end properly with finish reason "cancelled"
instead of being cut; then the lifespan stops the engine and the process exits 0. Uvicorn itself would raise
the signal again after a graceful shutdown, ending the process with the signal's status instead of 0. A second
signal closes the listener at once; a second SIGINT also skips the wait, as in uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType
from typing import Optional

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("uvicorn.error")       # configured by uvicorn, so drain messages are printed
RESPONSE_GRACE = 5.0      # seconds after the deadline for cancelled responses to reach their clients


class GracefulServer(uvicorn.Server):
    def __init__(self, app: FastAPI, shutdown_delay: float, shutdown_timeout: float, announce: str = "",
                 **config):
        # uvicorn's own wait starts when the listener closes and is only a backstop behind our deadline
        timeout = max(shutdown_timeout - shutdown_delay, 0) + RESPONSE_GRACE
        # asyncio and h11 even where uvloop / httptools are installed (the `ray` extra brings them): the
        # drain, disconnect and body-limit behaviour is tested and measured on these two
        config = {"loop": "asyncio", "http": "h11", **config}
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=timeout, **config))
        self.fastapi_app, self.shutdown_delay, self.shutdown_timeout = app, shutdown_delay, shutdown_timeout
        self.signalled_at: Optional[float] = None
        self._deadline: Optional[asyncio.TimerHandle] = None
        self.announce = announce

    async def startup(self, sockets=None) -> None:
        """uvicorn's startup (the lifespan loads the model, then the socket listens), then `announce`."""
        await super().startup(sockets=sockets)
        if self.announce and self.started:
            print(self.announce, flush=True)

    def handle_exit(self, sig: int, frame: Optional[FrameType]) -> None:
        if self.signalled_at is not None:
            self.should_exit = True
            self.force_exit = self.force_exit or sig == signal.SIGINT
            return
        self.signalled_at = time.monotonic()
        state = getattr(self.fastapi_app.state, "serving", None)
        if state is not None:
            state.ready = False

    async def on_tick(self, counter: int) -> bool:
        if self.signalled_at is not None:
            if self._deadline is None:
                log.info("Draining: /ready is 503; closing the listener in %.1f s; running requests have "
                         "%.1f s", self.shutdown_delay, self.shutdown_timeout)
                remaining = self.signalled_at + self.shutdown_timeout - time.monotonic()
                self._deadline = asyncio.get_running_loop().call_later(max(remaining, 0), self._cancel_running)
            if time.monotonic() >= self.signalled_at + self.shutdown_delay:
                self.should_exit = True
        return await super().on_tick(counter)

    def _cancel_running(self) -> None:
        state = getattr(self.fastapi_app.state, "serving", None)
        if state is not None:
            state.engine.cancel_all().add_done_callback(
                lambda done: log.warning("Shutdown deadline: cancelled %s request(s)", done.result()))
