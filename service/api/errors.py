"""Error mapping: every failure leaves as OpenAI's shape `{"error": {"message", "type", "code"}}` with its
HTTP status (registry errors carry theirs; validation 422; engine queue full 429 with Retry-After).

The OpenAPI document says so too: every API route lists the error statuses with that shape (replacing
FastAPI's default 422 body, which this service never sends), so clients and schema-driven fuzzers such as
schemathesis see the responses the service really gives.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import adapters_core as ac
from service.engine.engine import QueueFullError
from service.registry_errors import RegistryError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
         429: "rate_limit_error", 503: "service_unavailable"}


# Routes outside the API proper: liveness and metrics never fail, readiness answers 503 until ready.
OPERATION_ERRORS = {"/health": (), "/metrics": (), "/ready": (503,)}
API_ERRORS = (400, 401, 403, 404, 409, 413, 422, 429, 503)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": TYPES.get(status, "server_error"), "code": status}},
                        status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(RegistryError)
    async def registry_error(_: Request, exc: RegistryError):
        return error_response(exc.status, str(exc))

    @app.exception_handler(ac.AdapterError)
    async def adapter_error(_: Request, exc: ac.AdapterError):
        return error_response(404 if isinstance(exc, ac.UnknownAdapterError) else 422, str(exc))

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError):
        return error_response(429, f"the server is busy: {exc}", {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError):
        parts = [("the request body is not valid JSON" if e.get("type") == "json_invalid" else
                  f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}") for e in exc.errors()]
        return error_response(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    document(app)


def document(app: FastAPI) -> None:
    """Declare the error responses (OpenAI's shape) of every route in the app's OpenAPI document."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            model = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model.pop("$defs", {}))
            components[ErrorResponse.__name__] = model
            body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}}}
            for path, operations in schema.get("paths", {}).items():
                for operation in operations.values():
                    for status in OPERATION_ERRORS.get(path, API_ERRORS):
                        operation.setdefault("responses", {})[str(status)] = {
                            "description": TYPES[status].replace("_", " "), "content": body}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
