"""`build(args)`: the Ray Serve application of the service, as `serve run deploy/ray/config.yaml` builds it.

Two deployments: `Ingress` (HTTP, routes by adapter, ingress.py) and `EngineReplica` (the service, one engine
and one registry per replica on the shared store, replica.py). The config file's `args` are checked here, before
anything starts: `settings` are the service's settings (the `ADAPTER_SERVE_*` names in lower case; the
environment of the replicas applies under them), `max_adapters_per_replica` is the multiplexing cap (adapters
kept on one replica's device; at least the registry's `max_device_adapters` is raised to it) and
`rescan_timeout` bounds the broadcast that follows an admin change. Replica counts, autoscaling and actor
resources are Serve's own per-deployment options in the same file (`deployments:`); the defaults below are for
one machine.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

from service.settings import Settings

from .ingress import Ingress
from .replica import EngineReplica


class RayAppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(default_factory=dict)
    max_adapters_per_replica: int = Field(16, ge=1)
    rescan_timeout: float = Field(60.0, gt=0)


def build(args: dict[str, Any]) -> Application:
    try:
        parsed = RayAppArgs(**(args or {}))
        settings = Settings(**parsed.settings)
    except ValidationError as exc:
        raise ValueError(f"deploy/ray config `args` are not valid: {exc}") from None
    engine = serve.deployment(EngineReplica, name="EngineReplica", num_replicas=2,
                              max_ongoing_requests=settings.max_batch_size, max_queued_requests=settings.max_waiting,
                              health_check_period_s=10, graceful_shutdown_timeout_s=settings.shutdown_timeout)
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=1, max_ongoing_requests=1000)
    return ingress.bind(engine.bind(parsed.settings, parsed.max_adapters_per_replica),
                        max_body_bytes=settings.max_body_bytes, rescan_timeout=parsed.rescan_timeout)
