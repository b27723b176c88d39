"""`Ingress`: the Ray Serve HTTP entry of the service. It reads which adapter a request is for and forwards the
request to an `EngineReplica` through a deployment handle, with that adapter as `multiplexed_model_id`.

The adapter comes from the body: `model` on `/v1/completions`, `/v1/chat/completions` and `/v1/responses`,
`parameters.adapter_id` on TGI's `/generate`, `/generate_stream` and `/`; the base model's id, merged adapters,
other routes and bodies that do not parse carry no model id, so Serve spreads them by load (the replica then
answers a bad body with the service's own error). Every route is the service's own, run in the replica: this process parses no more than
that name and imports no torch. Responses come back as the replica sent them (its `X-Replica` header included):
server-sent events piece by piece, anything else whole. An admin request that changed the shared store (any
2xx to a POST / PUT / DELETE under `/admin/`, or vLLM's load / unload routes) is followed, before it is
answered, by a rescan broadcast to every replica through the handle, so an adapter answered 201 is servable on
every replica and a deleted one is refused by every replica; `X-Replicas-Rescanned: ok/all` says how many
followed. A replica that dies under a request (or is unreachable) is answered 503 with `Retry-After`, a full
replica queue 429, both in the service's error shape; clients retry those and reach a live replica.
"""

# No `from __future__ import annotations` here: Serve rewrites the route's signature, and FastAPI must see
# `Request` as a class, not as the string "Request".
import json
import logging
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from service.json_nesting import check_depth

from .forward import ForwardedRequest, response_headers

log = logging.getLogger("adapter_serve.ray")

MODEL_FIELD = {"/v1/completions": "model", "/v1/chat/completions": "model", "/v1/responses": "model",
               "/generate": "adapter_id", "/generate_stream": "adapter_id", "/": "adapter_id"}
ADMIN_WRITES = ("/admin/", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
REPLICA_GONE = (RayActorError, ActorUnavailableError, DeploymentUnavailableError)
RETRY_AFTER = "1"

api = FastAPI(title="adapter-serving (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)


def adapter_of(method: str, path: str, body: bytes, base_model: Optional[str]) -> Optional[str]:
    """The adapter a generation request names (the multiplexed model id), or None: route it by load."""
    field = MODEL_FIELD.get(path)
    if method != "POST" or field is None or not body:
        return None
    try:
        check_depth(body)                          # TooDeep is a ValueError: the replica answers it
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    if field == "adapter_id":
        data = data.get("parameters")
        if not isinstance(data, dict) or data.get("merged_adapters") is not None:
            return None
    name = data.get(field)
    if not isinstance(name, str) or not name or name == base_model:
        return None
    return name


def is_admin_write(method: str, path: str) -> bool:
    return method in ("POST", "PUT", "DELETE", "PATCH") and path.startswith(ADMIN_WRITES)


def error(status: int, message: str, retry: bool = False) -> JSONResponse:
    """The service's error shape, for what the ingress itself answers."""
    kinds = {413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
    return JSONResponse({"error": {"message": message, "type": kinds.get(status, "server_error"), "code": status}},
                        status_code=status, headers={"Retry-After": RETRY_AFTER} if retry else None)


@serve.ingress(api)
class Ingress:
    def __init__(self, engine: DeploymentHandle, max_body_bytes: int = 64 * 2**20, rescan_timeout: float = 60.0):
        self.engine = engine
        self.max_body_bytes = max_body_bytes
        self.rescan_timeout = rescan_timeout
        self.base_model: Optional[str] = None

    async def _base_model(self) -> Optional[str]:
        if self.base_model is None:
            try:
                self.base_model = (await self.engine.describe.remote())["model_id"]
            except Exception as exc:  # no replica answers yet: route this request by load
                log.warning("ingress: the base model's id is not known yet (%r)", exc)
        return self.base_model

    async def _body(self, request: Request) -> Optional[bytes]:
        """The whole body, or None when it is over `max_body_bytes` (counted as it arrives)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @api.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def proxy(self, path: str, request: Request) -> Response:
        body = await self._body(request)
        if body is None:
            return error(413, f"the request body is over {self.max_body_bytes} bytes (max_body_bytes)")
        method, path = request.method, request.url.path
        forwarded = ForwardedRequest(method, path, request.url.query.encode(), list(request.headers.raw), body,
                                     (request.client.host, request.client.port) if request.client else ("", 0))
        adapter = adapter_of(method, path, body, await self._base_model())
        handle = self.engine.options(stream=True, **({"multiplexed_model_id": adapter} if adapter else {}))
        pieces = handle.forward.remote(forwarded)
        try:
            _, status, headers = await pieces.__anext__()
            streaming = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
            if streaming:
                response = StreamingResponse(self._rest(pieces, path), status_code=status)
                response.raw_headers = response_headers(headers)
                return response
            content = b"".join([piece async for _, piece in pieces])
        except BaseException as exc:
            pieces.cancel()
            return self._failure(exc, method, path)
        response = Response(content, status_code=status)
        response.raw_headers = response_headers(headers) + [(b"content-length", str(len(content)).encode())]
        if 200 <= status < 300 and is_admin_write(method, path):
            response.raw_headers.append((b"x-replicas-rescanned", (await self._rescan_all()).encode()))
        return response

    async def _rest(self, pieces, path: str) -> AsyncIterator[bytes]:
        try:
            async for _, piece in pieces:
                yield piece
        except REPLICA_GONE as exc:     # the stream has started: the connection is cut, which clients see
            log.warning("ingress: the replica streaming %s went away: %r", path, exc)
            raise
        finally:
            pieces.cancel()             # the client went away: stop the generation in the replica

    def _failure(self, exc: BaseException, method: str, path: str) -> Response:
        if isinstance(exc, BackPressureError):
            return error(429, "every replica's queue is full; retry later", retry=True)
        cause = exc.cause if isinstance(exc, RayTaskError) else exc
        if isinstance(exc, REPLICA_GONE) or isinstance(cause, REPLICA_GONE):
            log.warning("ingress: %s %s: the replica went away (%s); answered 503", method, path, type(exc).__name__)
            return error(503, "the replica serving this request went away; retry (another replica will serve it)",
                         retry=True)
        if not isinstance(exc, Exception):
            raise exc                   # cancellation, interpreter exit
        log.error("ingress: %s %s failed in the replica: %r", method, path, exc)
        return error(500, f"internal server error in the replica: {type(cause).__name__}")

    async def _rescan_all(self) -> str:
        """Every replica re-reads the shared store now; 'ok/all' replicas that did."""
        try:
            results = await self.engine.broadcast("rescan").results_async(timeout_s=self.rescan_timeout,
                                                                         return_exceptions=True)
        except TimeoutError:
            log.error("ingress: the rescan broadcast did not finish within %.0f s", self.rescan_timeout)
            return "0/?"
        failed = [r for r in results if isinstance(r, BaseException)]
        for result in failed:
            log.warning("ingress: a replica did not rescan the store: %r", result)
        return f"{len(results) - len(failed)}/{len(results)}"
