"""Adapter management (admin key required once keys are configured): upload, load by path or hub id, list,
inspect, activate, deactivate, pin, unpin, delete, rescan the shared store, and vLLM's `/v1/load_lora_adapter` /
`/v1/unload_lora_adapter`. An upload carries exactly one weights file (safetensors or .bin) or one archive:
anything else is 422. Listings show quarantined adapters with `state` "quarantined" and their `error`."""

from __future__ import annotations

from typing import Literal, Optional

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict

from .deps import AdminCaller, StateDep
from .errors import shown
from .json_route import JsonRoute

router = APIRouter(route_class=JsonRoute)

_FILE = {"type": "string", "format": "binary"}
# The upload is read with `request.form()` (so size limits apply while parsing); this documents the form.
UPLOAD_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
                   "adapter_config.json": _FILE, "adapter_model.safetensors": _FILE, "adapter_model.bin": _FILE,
                   "archive": _FILE}}}}}}


UPLOAD_FIELDS = ("name", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "archive")


@router.post("/admin/adapters", status_code=201, openapi_extra=UPLOAD_FORM)
async def upload(request: Request, state: StateDep, _: AdminCaller, replace: bool = False):
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise HTTPException(415, f"send the upload as multipart/form-data (Content-Type {shown(kind or 'none')}): "
                                 f"the fields {', '.join(UPLOAD_FIELDS)}")
    form = await request.form(max_part_size=state.settings.max_body_bytes)
    fields = [key for key, _ in form.multi_items()]
    unknown = next((key for key in fields if key not in UPLOAD_FIELDS), None)
    if unknown is not None:
        raise HTTPException(422, f"form field {shown(unknown)} is not accepted ({', '.join(UPLOAD_FIELDS)})")
    twice = next((key for key in UPLOAD_FIELDS if fields.count(key) > 1), None)
    if twice is not None:
        raise HTTPException(422, f"form field {shown(twice)} is sent {fields.count(twice)} times; send it once")
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise HTTPException(422, "form field 'name' is required")
    archive = form.get("archive")
    config = form.get("adapter_config.json")
    safetensors, pickled = form.get("adapter_model.safetensors"), form.get("adapter_model.bin")
    if safetensors is not None and pickled is not None:
        raise HTTPException(422, "send one weights file: 'adapter_model.safetensors' or 'adapter_model.bin', "
                                 "not both")
    weights = safetensors if safetensors is not None else pickled
    if archive is not None and (config is not None or weights is not None):
        raise HTTPException(422, "send either the file 'archive' or the files 'adapter_config.json' and "
                                 "'adapter_model.safetensors', not both")
    if archive is not None and hasattr(archive, "read"):
        record = await state.registry.register_archive(name, await archive.read(), archive.filename or "",
                                                       replace=replace)
    elif config is not None and weights is not None and hasattr(config, "read") and hasattr(weights, "read"):
        weights_name = "adapter_model.bin" if weights is pickled else "adapter_model.safetensors"
        record = await state.registry.register_files(name, await config.read(), await weights.read(),
                                                     weights_filename=weights_name, replace=replace)
    else:
        raise HTTPException(422, "send the files 'adapter_config.json' and 'adapter_model.safetensors', or one "
                                 "file field 'archive' (.zip or .tar.gz)")
    return record.to_dict()


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["local", "hub"]
    path: Optional[str] = None
    repo_id: Optional[str] = None
    revision: Optional[str] = None
    replace: bool = False


@router.put("/admin/adapters/{name}", status_code=201)
async def load(name: str, body: Source, state: StateDep, _: AdminCaller):
    if body.source == "local":
        if not body.path:
            raise HTTPException(422, "'path' is required for source 'local'")
        if body.repo_id is not None or body.revision is not None:
            raise HTTPException(422, "'repo_id' and 'revision' are for source 'hub'; source 'local' takes 'path'")
        record = await state.registry.register_path(name, body.path, replace=body.replace)
    else:
        if not body.repo_id:
            raise HTTPException(422, "'repo_id' is required for source 'hub'")
        if body.path is not None:
            raise HTTPException(422, "'path' is for source 'local'; source 'hub' takes 'repo_id' (and 'revision')")
        record = await state.registry.register_hub(name, body.repo_id, body.revision, replace=body.replace)
    return record.to_dict()


@router.get("/admin/adapters")
async def list_adapters(state: StateDep, _: AdminCaller):
    return {"adapters": [r.to_dict() for r in state.registry.list()], "tiers": state.registry.tier_counts(),
            "adapter_dtype": state.registry.adapter_dtype.setting}


@router.get("/admin/adapters/{name}")
async def get_adapter(name: str, state: StateDep, _: AdminCaller):
    return state.registry.get(name).to_dict()


@router.delete("/admin/adapters/{name}")
async def delete_adapter(name: str, state: StateDep, _: AdminCaller):
    await state.registry.delete(name)
    return {"deleted": name}


@router.post("/admin/rescan")
async def rescan(state: StateDep, _: AdminCaller):
    """Re-read the adapter store (shared by several replicas): what other replicas added, replaced,
    deactivated or deleted takes effect here without a restart."""
    return await state.registry.rescan()


@router.post("/admin/adapters/{name}/activate")
async def activate(name: str, state: StateDep, _: AdminCaller):
    return (await state.registry.activate(name)).to_dict()


@router.post("/admin/adapters/{name}/deactivate")
async def deactivate(name: str, state: StateDep, _: AdminCaller):
    return (await state.registry.deactivate(name)).to_dict()


@router.post("/admin/adapters/{name}/pin")
async def pin(name: str, state: StateDep, _: AdminCaller):
    """Never evict it from the tier it reaches (pinning does not load it)."""
    return (await state.registry.pin(name, True)).to_dict()


@router.post("/admin/adapters/{name}/unpin")
async def unpin(name: str, state: StateDep, _: AdminCaller):
    return (await state.registry.pin(name, False)).to_dict()


class LoadLora(BaseModel):
    """vLLM's body; its `load_inplace` (and any other key) is refused as unknown: replace with `PUT
    /admin/adapters/{name}` and `replace: true`."""
    model_config = ConfigDict(extra="forbid")

    lora_name: str
    lora_path: str


class UnloadLora(BaseModel):
    """vLLM's body; its `lora_int_id` (vLLM's internal id, which this server has none of) is refused as unknown."""
    model_config = ConfigDict(extra="forbid")

    lora_name: str


@router.post("/v1/load_lora_adapter")
async def load_lora(body: LoadLora, state: StateDep, _: AdminCaller):
    await state.registry.register_path(body.lora_name, body.lora_path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


@router.post("/v1/unload_lora_adapter")
async def unload_lora(body: UnloadLora, state: StateDep, _: AdminCaller):
    await state.registry.delete(body.lora_name)
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
