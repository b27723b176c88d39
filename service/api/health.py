"""Operations: `/health` (the process is alive) and `/ready` (model loaded, engine running) need no key;
`/metrics` (Prometheus text format, refreshed gauges) needs the metrics key or the admin key when either is
configured (see `deps.metrics_caller`)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .deps import MetricsCaller, StateDep
from .errors import error_response

router = APIRouter()


@router.get("/health")
def health():
    return {"status": "ok"}


@router.get("/ready")
def ready(state: StateDep):
    if not state.ready:
        return error_response(503, "not ready")
    return {"status": "ready", "model": state.model_id}


@router.get("/metrics", responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
def metrics(state: StateDep, _: MetricsCaller):
    state.metrics.set_tiers(state.registry.tier_counts())
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
