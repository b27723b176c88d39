"""`GET /stats`: one small JSON snapshot of the service's load for the operator console's live view, which
reads it every second or two: requests running and waiting (and the engine's limits), cumulative tokens and
finished requests by outcome (the console turns two reads into tokens/s), KV cache use, adapters and their
bytes per tier (stored: the files; cpu, device: in memory) with the tiers' limits and the dtype adapters are
held in (`adapter_dtype`), deactivated and quarantined counts, and the latest failures
(`RecentErrors`). It needs what `/metrics` needs (the metrics key or the admin key once keys are configured),
since the errors name adapters and paths; it reads the registry, so it runs on the event loop like `/metrics`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter

from .deps import MetricsCaller, StateDep
from .json_route import JsonRoute

router = APIRouter(route_class=JsonRoute)
RECENT_ERRORS = 20


@router.get("/stats")
async def stats(state: StateDep, _: MetricsCaller):
    engine, registry, s = state.engine, state.registry, state.settings
    records = registry.list()
    cache = engine.cache
    return {
        "time": time.time(),
        "model": state.model_id,
        "weights": state.weights,
        "ready": state.ready,
        "requests": {"running": engine.num_running, "waiting": engine.num_waiting + registry.slot_waiters,
                     "waiting_for_adapter_slot": registry.slot_waiters,
                     "max_running": s.max_batch_size, "max_waiting": s.max_waiting},
        "totals": state.metrics.totals(),
        "kv_cache": {"usage": 1 - cache.free_slots / cache.num_slots, "slots": cache.num_slots,
                     "free_slots": cache.free_slots},
        "adapters": {"tiers": registry.tier_counts(), "bytes": registry.tier_bytes(), "total": len(records),
                     "limits": {"device": registry.max_device_adapters, "cpu": registry.max_cpu_adapters,
                                "device_bytes": s.adapter_memory_budget or None},
                     "dtype": registry.adapter_dtype.setting,
                     "deactivated": sum(not r.served for r in records),
                     "quarantined": sum(r.quarantined for r in records),
                     "pinned": sum(r.pinned for r in records)},
        "errors": {"total": state.metrics.recent_errors.total,
                   "recent": state.metrics.recent_errors.latest(RECENT_ERRORS)},
    }
