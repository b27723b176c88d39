"""The operator console: `GET /console` serves the single page and `GET /console/assets/<file>` its scripts
and styles, all plain files from `service/console/` (no build step, nothing fetched from another host; the
Content-Security-Policy allows this origin only). The page itself needs no key: it asks the operator for one,
keeps it in the tab's memory and sends it as `Authorization: Bearer` to the ordinary API routes, so it can do
exactly what that key can do over HTTP. `GET /console/session` tells the page what the key may see: `admin`
(adapters, playground, live view), `inference` (the playground, over the adapters its allow-list names), or
`open` when no keys are configured; `metrics` says whether `/stats` will answer. `ADAPTER_SERVE_CONSOLE=false`
turns the page off (404); the session route stays, as it reveals nothing a key cannot find out by itself.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from .deps import MISSING_KEY, StateDep, _bearer
from .json_route import JsonRoute

router = APIRouter(route_class=JsonRoute)
STATIC = Path(__file__).resolve().parents[1] / "console"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Only this origin: scripts, styles, fetches and images (the favicon is a data: URL) never leave the server.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
           "Referrer-Policy": "no-referrer"}


def _assets() -> dict[str, Path]:
    """The files the console may serve, by name: read once, so a request can never name another path."""
    return {p.name: p for p in sorted(STATIC.iterdir()) if p.is_file() and p.suffix in TYPES}


ASSETS = _assets()


def _file(state, name: str) -> Response:
    path = ASSETS.get(name)
    if not state.settings.console or path is None:
        raise HTTPException(404, "not found")
    return Response(path.read_bytes(), media_type=TYPES[path.suffix], headers=HEADERS)


@router.get("/console", include_in_schema=False)
def console(state: StateDep):
    return _file(state, "index.html")


@router.get("/console/assets/{name}", include_in_schema=False)
def asset(name: str, state: StateDep):
    return _file(state, name)


@router.get("/console/session")
async def session(request: Request, state: StateDep):
    """What the caller's key may see in the console (401 for a missing or unknown key once keys exist)."""
    s = state.settings
    body = {"model": state.model_id, "max_tokens_limit": s.max_tokens_limit}
    if not s.auth_enabled:
        return {**body, "role": "open", "adapters": None, "metrics": True}
    key = _bearer(request)
    if key is None:
        raise HTTPException(401, MISSING_KEY)
    if s.admin_key is not None and key == s.admin_key:
        return {**body, "role": "admin", "adapters": None, "metrics": True}
    if key in s.api_keys:
        allowed = s.key_adapters.get(key)
        return {**body, "role": "inference", "adapters": allowed, "metrics": key == s.metrics_key}
    if s.metrics_key and key == s.metrics_key:
        raise HTTPException(401, "this key only reads metrics: the console needs an inference or admin key")
    raise HTTPException(401, "invalid API key")
