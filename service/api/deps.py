"""Dependencies: the app's state (built in the lifespan) and API-key checks as `Annotated` aliases.

Keys: inference keys (`api_keys`, optionally limited to some adapters by `key_adapters`), the admin key
(everything), and the metrics key (`metrics_key`, only `/metrics`; without one, `/metrics` is open when no keys
are configured and needs the admin key when they are, since adapter names are in its labels). `known_key` is
the header-only check `BodyLimit` runs before the body is read. The dependencies are `async def`: FastAPI runs a
plain `def` dependency in its thread pool, two hand-offs to a worker thread and back for every request, each
waiting for the GIL behind the engine and the loader (BENCHMARKS.md, thirty-eighth session).
"""

from __future__ import annotations

from typing import Annotated, Optional

from fastapi import Depends, HTTPException, Request

from service.settings import Settings


class State:
    """What the lifespan builds: settings, loaded model, engine, registry, generator, metrics."""

    def __init__(self, settings: Settings, loaded, engine, registry, generator, metrics, model_id: str):
        self.settings, self.loaded, self.engine, self.registry = settings, loaded, engine, registry
        self.generator, self.metrics, self.model_id = generator, metrics, model_id
        self.weights: dict = {}          # weight_format.weights_summary: what the base is served as
        self.ready = False


async def get_state(request: Request) -> State:
    return request.app.state.serving


def _bearer(request: Request) -> Optional[str]:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else None


class Caller:
    """Who is calling: their key, and the adapters they may use (None = all)."""

    def __init__(self, key: Optional[str], allowed: Optional[set[str]]):
        self.key, self.allowed = key, allowed

    def may_use(self, adapter: Optional[str]) -> bool:
        return adapter is None or self.allowed is None or adapter in self.allowed


MISSING_KEY = "missing API key (Authorization: Bearer <key>)"


def known_key(s: Settings, key: Optional[str]) -> Optional[str]:
    """None if `key` is an inference or admin key; else why not (a 401 message). Keys configured only."""
    if key is None:
        return MISSING_KEY
    if key == s.admin_key or key in s.api_keys:
        return None
    return "invalid API key"


async def inference_caller(request: Request, state: Annotated[State, Depends(get_state)]) -> Caller:
    s = state.settings
    if not s.auth_enabled:
        return Caller(None, None)
    key = _bearer(request)
    if key is None:
        raise HTTPException(401, MISSING_KEY)
    if key == s.admin_key:
        return Caller(key, None)
    if key not in s.api_keys:
        raise HTTPException(401, "invalid API key")
    allowed = s.key_adapters.get(key)
    return Caller(key, set(allowed) if allowed is not None else None)


async def admin_caller(request: Request, state: Annotated[State, Depends(get_state)]) -> Caller:
    s = state.settings
    if not s.auth_enabled:
        return Caller(None, None)
    key = _bearer(request)
    if key is None:
        raise HTTPException(401, "missing admin key (Authorization: Bearer <key>)")
    if s.admin_key is not None and key == s.admin_key:
        return Caller(key, None)
    if key in s.api_keys:
        raise HTTPException(403, "this key may not use admin routes")
    raise HTTPException(401, "invalid API key")


async def metrics_caller(request: Request, state: Annotated[State, Depends(get_state)]) -> None:
    check_metrics_key(request, state)


def check_metrics_key(request: Request, state: State) -> None:
    """`metrics_caller`'s check, for a route that applies it only under a setting (`/metrics/gateway`)."""
    s = state.settings
    if not s.metrics_key and not s.auth_enabled:
        return
    key = _bearer(request)
    if key and key in (s.metrics_key, s.admin_key):
        return
    if key is None:
        raise HTTPException(401, "missing metrics key (Authorization: Bearer <metrics key or admin key>)")
    if not s.metrics_key and key in s.api_keys:
        raise HTTPException(403, "/metrics needs the admin key (or set ADAPTER_SERVE_METRICS_KEY)")
    raise HTTPException(401, "invalid metrics key")


StateDep = Annotated[State, Depends(get_state)]
InferenceCaller = Annotated[Caller, Depends(inference_caller)]
AdminCaller = Annotated[Caller, Depends(admin_caller)]
MetricsCaller = Annotated[None, Depends(metrics_caller)]
