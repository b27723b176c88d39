"""What a TGI / LoRAX request runs on: `adapter_id` (+ `adapter_source`), LoRAX's `merged_adapters`, and
`adapter_scale`, resolved to an `AdapterTarget`.

Each id of `merged_adapters` is resolved as `adapter_id` is (a registered name, or with `adapter_source` the hub
repo id or folder it was registered from; the caller's allow-list applies), then the spec is checked before
the registry merges anything: 404 naming the id for an unknown adapter, 422 naming the field for mismatched
lengths, strategies this server does not do, a missing density. The merge itself (and its cache) is
service/registry/merged.py."""

from __future__ import annotations

from fastapi import HTTPException

from service.adapter_target import AdapterTarget
from service.registry import MergeSpec

from .tgi_params import Parameters, resolve_adapter

FIELD = "parameters.merged_adapters"


def resolve_target(p: Parameters, state, caller) -> AdapterTarget:
    scale = 1.0 if p.adapter_scale is None else p.adapter_scale
    merged = p.merged_adapters
    if merged is None:
        return AdapterTarget(resolve_adapter(p, state, caller), scale=scale)
    names = []
    for i, adapter_id in enumerate(merged.ids):
        try:
            name = resolve_adapter(p.model_copy(update={"adapter_id": adapter_id}), state, caller)
        except HTTPException as exc:
            raise HTTPException(exc.status_code, f"{FIELD}.ids[{i}]: {exc.detail}") from None
        if name is None:
            raise HTTPException(422, f"{FIELD}.ids[{i}]: the base model is not an adapter to merge")
        names.append(name)
    spec = MergeSpec(tuple(names), tuple(merged.weights), merged.merge_strategy or "linear", merged.density,
                     merged.majority_sign_method or "total")
    spec.check(FIELD)
    return AdapterTarget(merge=spec, scale=scale)
