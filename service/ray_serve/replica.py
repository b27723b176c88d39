"""`EngineReplica`: one Ray Serve replica of the service, multiplexed by adapter name.

Each replica builds the whole service in its process (`service.app.create_app` and its lifespan: the base model,
the engine thread, one adapter registry on the store that all replicas share) and runs every forwarded HTTP
request through that app (`forward.run_asgi`), so the routes, keys, limits and errors are the service's own;
responses name the replica in `X-Replica` (the Serve replica id). Ray Serve's model multiplexing does the
affinity: the ingress calls `forward` with `multiplexed_model_id` = the adapter's name, Serve routes the call to
a replica that already holds that adapter (another one when those are saturated), and the replica's multiplexed
loader brings the adapter to its registry's device tier (`AdapterRegistry.load`). Serve evicts adapters beyond
`max_adapters` per replica in LRU order; eviction moves the adapter out of the device tier here
(`AdapterRegistry.evict`) and leaves the store alone, since other replicas keep serving it. `rescan` is what the
ingress broadcasts to every replica after an admin change to the shared store.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, AsyncIterator, Optional

from ray import serve

from service.app import create_app
from service.registry import RegistryError
from service.settings import Settings

from .forward import ForwardedRequest, Piece, run_asgi

log = logging.getLogger("adapter_serve")


class ResidentAdapter:
    """What the multiplexed loader returns for one adapter. Serve awaits `__del__` when it evicts the adapter
    from this replica; it is set on the instance (not the class) so that garbage collection never calls it."""

    def __init__(self, replica: "EngineReplica", name: str):
        self.name = name

        async def evict() -> None:
            await replica.evict(name)

        self.__del__ = evict


class EngineReplica:
    async def __init__(self, settings: dict[str, Any], max_adapters: int = 16):
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        overrides = {"replica_name": self.replica_id,
                     "max_device_adapters": max(max_adapters, int(settings.get("max_device_adapters", 0)))}
        self.settings = Settings(**{**settings, **overrides})
        self.app = create_app(self.settings)
        self._lifespan = contextlib.AsyncExitStack()
        await self._lifespan.enter_async_context(self.app.router.lifespan_context(self.app))
        self.state = self.app.state.serving

        async def load(name: str) -> ResidentAdapter:
            await self.state.registry.load(name)
            return ResidentAdapter(self, name)

        # Decorated here so that the per-replica cap comes from the config file (Serve detects a multiplexed
        # loader kept on the instance); `_get_adapter(name)` loads, or returns what is loaded, and evicts LRU.
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=max_adapters)(load)
        log.info("replica %s serving %s (at most %d adapters on the device)", self.replica_id, self.state.model_id,
                 max_adapters)

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[Piece]:
        """Run one HTTP request through the service's app, holding its adapter first when one is named."""
        adapter = serve.get_multiplexed_model_id()
        if adapter:
            try:
                await self._get_adapter(adapter)
            except RegistryError:
                pass                  # unknown, deactivated, no free slot: the route answers with its own error
        async for piece in run_asgi(self.app, request):
            yield piece

    async def call(self, request: ForwardedRequest) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The whole response to one request at once (status, headers, body): what `handle.broadcast` can
        use to ask every replica the same thing, e.g. whether each one serves an adapter."""
        status, headers, body = 500, [], []
        async for piece in run_asgi(self.app, request):
            if piece[0] == "start":
                status, headers = piece[1], piece[2]
            else:
                body.append(piece[1])
        return status, headers, b"".join(body)

    async def evict(self, name: str) -> None:
        try:
            await self.state.registry.evict(name)
        except RegistryError:
            pass                      # deleted meanwhile: nothing left to evict

    async def rescan(self) -> dict[str, Any]:
        """Bring this replica's registry in line with the shared store (after another replica changed it)."""
        return {"replica": self.replica_id, **await self.state.registry.rescan()}

    async def describe(self) -> dict[str, Any]:
        """The base model's id (what the ingress routes without affinity), this replica and its device tier."""
        device = [r.name for r in self.state.registry.list() if r.tier == "device"]
        return {"model_id": self.state.model_id, "replica": self.replica_id, "device_adapters": device}

    async def check_health(self) -> None:
        """Serve's health check: what `/ready` says (model loaded, engine running)."""
        if not self.state.ready:
            raise RuntimeError(f"replica {self.replica_id} is not ready")

    async def __del__(self) -> None:
        lifespan: Optional[contextlib.AsyncExitStack] = getattr(self, "_lifespan", None)
        if lifespan is not None:
            self._lifespan = None
            await lifespan.aclose()
