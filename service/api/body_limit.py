"""`BodyLimit`: an ASGI middleware that guards every request body before and while it is read.

1. The API key is checked from the headers before a byte of the body is read: with keys configured, a
   request that can carry a body (any method but GET, HEAD, OPTIONS) and has no known key gets its 401 at
   once, so nobody without a key can make the server read, buffer or wait for a body. (The route's own
   dependency still decides which key may do what: admin routes answer 403 to an inference key.)
2. Size: adapter uploads (`POST /admin/adapters`) may be `max_body_bytes`; every other body, JSON,
   `max_request_bytes` (at most `max_body_bytes`). A declared `Content-Length` over the limit is answered 413
   before the body is read; a body sent without one (chunked) or longer than it declared is counted as it
   arrives, and the read that crosses the limit raises a 413 inside the route.
3. Time: the whole body must arrive within `body_timeout` seconds of its first read; a body still incomplete
   then (a slow-loris client declaring a megabyte and sending a byte) gets 408 and the connection is closed.
   Once the body is complete, reads (a route waiting for the client's disconnect) are not timed.
Early answers carry `Connection: close`: the unread rest of the body must not be taken for the next request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

from .deps import known_key
from .errors import error_response

CLOSE = {"Connection": "close"}
NO_BODY = ("GET", "HEAD", "OPTIONS")
UPLOAD = ("POST", "/admin/adapters")


class BodyLimit:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        s = self.settings
        headers = dict(scope.get("headers") or [])
        if s.auth_enabled and scope["method"] not in NO_BODY:
            problem = known_key(s, _bearer(headers))
            if problem is not None:
                await error_response(401, problem, CLOSE)(scope, receive, send)
                return
        limit, name = ((s.max_body_bytes, "max_body_bytes") if (scope["method"], scope["path"]) == UPLOAD else
                       (min(s.max_request_bytes, s.max_body_bytes), "max_request_bytes"))
        message = f"request body over {limit} bytes ({name})"
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await error_response(413, message, CLOSE)(scope, receive, send)
            return
        seen, complete, deadline = 0, False, None

        async def guarded() -> Message:
            nonlocal seen, complete, deadline
            if complete:
                return await receive()
            deadline = deadline or time.monotonic() + s.body_timeout
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {s.body_timeout:g} s "
                                         "(body_timeout)", CLOSE) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, message, CLOSE)
                complete = not msg.get("more_body", False)
            else:
                complete = True
            return msg

        await self.app(scope, guarded, send)


def _bearer(headers: dict[bytes, bytes]) -> Optional[str]:
    value = headers.get(b"authorization", b"").decode("latin-1")
    return value[7:].strip() if value.lower().startswith("bearer ") else None
