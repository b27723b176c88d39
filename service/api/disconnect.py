"""`cancel_on_disconnect`: run a non-streaming generation while watching the client's connection.

If the client goes away first, the generation is cancelled (its engine request leaves the batch at the next
engine step, its adapter lease is released) and an empty 499 response, nginx's "client closed request", is
handed to a connection nobody reads any more. Streaming responses need no help: Starlette cancels the body
iterator as soon as the server reports the disconnect, and closing that iterator cancels the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

from fastapi import Request, Response

T = TypeVar("T")
CLIENT_CLOSED = 499


async def _disconnected(request: Request) -> None:
    # The body has been read by now, so the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():           # the client left (or this handler itself was cancelled)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return Response(status_code=CLIENT_CLOSED)
    return task.result()
