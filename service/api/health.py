"""Operations: `/health` (the process is alive) and `/ready` (model loaded, engine running) need no key;
`/metrics` (Prometheus text format, refreshed gauges: ours and the `vllm:*` gauges of the Gateway API
Inference Extension) needs the metrics key or the admin key when either is configured (see
`deps.metrics_caller`). `/metrics/gateway` serves only the `vllm:*` gauges, for the endpoint picker, which
cannot send a key when it scrapes: with `gateway_metrics_open` it needs none (it shows the queue, the KV cache
and the names of the adapters on the device), otherwise it needs what `/metrics` needs. Both run on the
event loop, where the registry they read is changed."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .deps import MetricsCaller, StateDep, check_metrics_key
from .errors import error_response
from .json_route import JsonRoute

router = APIRouter(route_class=JsonRoute)
PROMETHEUS = {200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}}


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: StateDep):
    if not state.ready:
        return error_response(503, "not ready")
    return {"status": "ready", "model": state.model_id}


@router.get("/metrics", responses=PROMETHEUS)
async def metrics(state: StateDep, _: MetricsCaller):
    state.metrics.set_tiers(state.registry.tier_counts(), state.registry.tier_bytes())
    state.metrics.refresh_adapters()
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/gateway", responses=PROMETHEUS)
async def gateway_metrics(state: StateDep, request: Request):
    if not state.settings.gateway_metrics_open:
        check_metrics_key(request, state)
    state.metrics.refresh_adapters()
    return Response(generate_latest(state.metrics.gateway_registry), media_type=CONTENT_TYPE_LATEST)
