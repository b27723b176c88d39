"""`warm_up(app)`: the work a server's first requests would otherwise do on the event loop, done before it is ready.

Two libraries build state on first use, and a server's first requests are usually a burst (a deploy, a scale-out, a
benchmark's start): FastAPI resolves each router's routes and their dependencies when a request first walks that
router (28 route states built on a start burst's first requests here: ~20-40 ms of the loop), and anyio imports its
asyncio backend on the first streamed response (~30-50 ms). Meanwhile the loop neither takes in the burst's other
requests nor takes back the adapter reads that finished for it, so every load of the burst waited behind them
(BENCHMARKS.md, "Many adapters", forty-first session). Here the router is walked once with a path no route matches
(so every router is resolved; the app's middleware is not involved, so no request is counted or logged), and anyio's
backend is imported.
"""

from __future__ import annotations

import importlib

from fastapi import FastAPI

from service.ray_serve.forward import ForwardedRequest, run_asgi    # (no Ray there: an in-process ASGI call)

WARM_UP_PATH = "/.adapter-serve-warm-up"        # matches no route


async def warm_up(app: FastAPI) -> int:
    """Resolve every route of `app`'s router and load anyio's asyncio backend; returns the status the router
    answered the unmatched path with (404)."""
    importlib.import_module("anyio._backends._asyncio")
    status = 0
    async for piece in run_asgi(app.router, ForwardedRequest("GET", WARM_UP_PATH)):
        if piece[0] == "start":
            status = piece[1]
    return status
