"""One HTTP request carried from the Ray Serve ingress to an engine replica, and run there through the service's
own ASGI app.

`ForwardedRequest` is what crosses the deployment handle: method, path, query, headers and the whole body
(plain, picklable data). `run_asgi` runs it through an app in-process and yields the response as it is sent:
first `("start", status, headers)`, then `("body", bytes)` pieces, so a server-sent-event stream reaches the
client token by token through the handle's streaming call. If the caller stops iterating (the client went
away, the ingress cancelled the call), the app sees `http.disconnect`, exactly as under uvicorn, and the
service's own disconnect handling ends the generation; an app that does not stop within `STOP_SECONDS` is
cancelled. No Ray import here: the same code runs under any caller.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Union

# Headers that describe one hop, not the request: they are not carried to the replica (or back).
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                         b"trailer", b"transfer-encoding", b"upgrade", b"content-length"})
STOP_SECONDS = 5.0

Piece = Union[tuple[str, int, list[tuple[bytes, bytes]]], tuple[str, bytes]]


@dataclass
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] = ("127.0.0.1", 0)

    def scope(self) -> dict:
        headers = [(k.lower(), v) for k, v in self.headers if k.lower() not in HOP_HEADERS]
        headers.append((b"content-length", str(len(self.body)).encode()))
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "query_string": self.query_string, "root_path": "", "headers": headers, "client": self.client,
                "server": ("ray-serve-replica", 0)}


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A replica's response headers as the ingress may send them on (its own framing replaces the hop's)."""
    return [(k, v) for k, v in headers if k.lower() not in HOP_HEADERS]


async def run_asgi(app, request: ForwardedRequest) -> AsyncIterator[Piece]:
    """Run `request` through the ASGI `app`; yield the response start, then its body pieces."""
    messages: asyncio.Queue = asyncio.Queue()
    finished = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()                       # the response is done or its reader has gone
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(request.scope(), receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while True:
            message = await messages.get()
            if message is None:                     # the app returned (or raised) without finishing a body
                task.result()
                raise RuntimeError(f"{request.method} {request.path}: the app ended without a complete response")
            if message["type"] == "http.response.start":
                yield ("start", message["status"], list(message.get("headers") or []))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield ("body", bytes(message["body"]))
                if not message.get("more_body", False):
                    break
    finally:
        finished.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), STOP_SECONDS)
            task.cancel()
