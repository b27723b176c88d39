"""`warm_up(app)`: the work a server's first requests would otherwise do on the event loop, done before it is ready.

Two libraries build state on first use, and a server's first requests are usually a burst (a deploy, a scale-out,
a benchmark's start): FastAPI resolves each router's routes and their dependencies when a request first walks that
router (28 route states built on a start burst's first requests here: ~20-40 ms of the loop), and anyio imports its asyncio backend on the
first streamed response (~30-50 ms). Meanwhile the loop neither takes in the burst's other requests nor takes back
the adapter reads that finished for it, so every load of the burst waited behind them (BENCHMARKS.md, "Many
adapters", forty-first session). Here the router is walked once with a path no route matches (so every router is
resolved; the app's middleware is not involved, so no request is counted or logged), and anyio's backend is
imported.
"""

from __future__ import annotations

import importlib

from fastapi import FastAPI

WARM_UP_PATH = "/.adapter-serve-warm-up"        # matches no route


async def warm_up(app: FastAPI) -> int:
    """Resolve every route of `app`'s router and load anyio's asyncio backend; returns the status the router
    answered the unmatched path with (404)."""
    importlib.import_module("anyio._backends._asyncio")
    answered: list[int] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answered.append(message["status"])

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": WARM_UP_PATH, "raw_path": WARM_UP_PATH.encode(), "root_path": "", "query_string": b"",
             "headers": [], "client": None, "server": None}
    await app.router(scope, receive, send)
    return answered[0]
