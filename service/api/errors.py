"""Error mapping: every failure leaves as OpenAI's shape `{"error": {"message", "type", "code"}}` with its
HTTP status (registry errors carry theirs; validation 422; engine queue full 429 with Retry-After), and the
request's id (`service/api/request_id.py`) as `request_id`. On the TGI / LoRAX routes the body is TGI's:
`{"error": message, "error_type"}` (`validation`, `overloaded`, `generation`; none for other statuses), so
their clients raise the matching error with the message as its text. Exceptions that only bad input raises
(an invalid regular expression, JSON nested past Python's recursion limit, text that is not valid Unicode, a
chat template refusing the conversation) are 4xx whatever code raised them; anything else is a server fault (a
500 from the request-id middleware).
Messages are truncated and their control characters escaped, so a user's string echoed back can neither be
megabytes long nor look like more than it is.

The OpenAPI document says so too: every API route lists the error statuses with that shape (replacing
FastAPI's default 422 body, which this service never sends), so clients and schema-driven fuzzers such as
schemathesis see the responses the service really gives.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

import adapters_core as ac
from service.engine.engine import QueueFullError
from service.json_nesting import TooDeep
from service.logs import escape_control
from service.model.chat_template import ChatTemplateBroken, ChatTemplateError
from service.registry import RegistryError, Unavailable

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 408: "request_timeout", 409: "conflict_error", 413: "request_too_large",
         415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
         503: "service_unavailable"}


# Routes outside the API proper: liveness never fails, metrics may need a key, readiness answers 503 until ready.
OPERATION_ERRORS = {"/health": (), "/metrics": (401, 403), "/metrics/gateway": (401, 403), "/ready": (503,),
                    "/info": (), "/stats": (401, 403), "/console/session": (401,)}
API_ERRORS = (400, 401, 403, 404, 408, 409, 413, 415, 422, 429, 500, 503)
MAX_SHOWN = 256              # characters of a user's string (a model name...) echoed in a message
MAX_MESSAGE = 4096           # characters of any error message

# Validation errors said in this service's words: a field no request model declares is refused, never ignored.
_MESSAGES = {"extra_forbidden": "not supported by this server (an unknown field, or one it does not implement)"}

request_id: ContextVar[Optional[str]] = ContextVar("request_id", default=None)


def shown(value: str, limit: int = MAX_SHOWN) -> str:
    """A user's string for a message: quoted, control characters escaped, cut to `limit` characters."""
    text = escape_control(value[:limit])
    return f"'{text}'" if len(value) <= limit else f"'{text}'... ({len(value)} characters)"


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int
    request_id: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TgiErrorResponse(BaseModel):
    """TGI's and LoRAX's error body (their routes `TGI_PATHS`)."""
    error: str
    error_type: Optional[str] = None
    request_id: Optional[str] = None


def error_detail(status: int, message: str) -> dict:
    """The `error` object of a failure: {"message", "type", "code"} (and the request's id when known)."""
    message = escape_control(message[:MAX_MESSAGE])
    error = {"message": message, "type": TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
             "code": status}
    if request_id.get() is not None:
        error["request_id"] = request_id.get()
    return error


def error_response(status: int, message: str, headers: dict | None = None, tgi: bool = False) -> JSONResponse:
    """OpenAI's shape; `tgi`: TGI's and LoRAX's, `{"error": message, "error_type"}` (their clients raise the class
    `error_type` names, with `error` as its message), the request's id beside them."""
    error = error_detail(status, message)
    if tgi:
        body = {"error": error["message"], **({"error_type": TGI_ERROR_TYPES[status]} if status in TGI_ERROR_TYPES
                                              else {}), **({"request_id": error["request_id"]} if "request_id" in error
                                                           else {})}
    else:
        body = {"error": error}
    return JSONResponse(body, status_code=status, headers=headers)


# TGI's and LoRAX's clients choose their exception from an `error_type` beside `error`: their routes add it.
TGI_PATHS = ("/", "/generate", "/generate_stream")
TGI_ERROR_TYPES = {400: "validation", 413: "validation", 422: "validation", 429: "overloaded", 500: "generation"}


def _respond(request: Request, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return error_response(status, message, headers, tgi=request.url.path in TGI_PATHS)


# Exceptions only malformed input raises, wherever they come from: (status, what to say).
INPUT_ERRORS = {
    re.error: (422, lambda e: f"invalid regular expression {shown(str(e.pattern))}: {e}"
               if isinstance(getattr(e, "pattern", None), str) else f"invalid regular expression: {e}"),
    RecursionError: (422, lambda e: "the input nests too deeply (JSON objects or lists inside each other)"),
    TooDeep: (422, str),
    UnicodeError: (400, lambda e: f"the input is not valid Unicode text ({type(e).__name__}: {e.reason})"
                   if hasattr(e, "reason") else f"the input is not valid Unicode text: {e}"),
    ChatTemplateError: (400, str),
}


def _whole_body_problem(request: Request, kind: Optional[str]) -> Optional[tuple[int, str]]:
    """(status, message) when the body as a whole is wrong: missing, or not read as JSON for its Content-Type."""
    from .json_route import json_body          # (json_route imports this module)
    if kind == "missing":
        return 422, "the request body is empty: send a JSON object"
    if not json_body(request):                  # FastAPI did not read it as JSON
        main = request.headers.get("content-type", "").split(";")[0].strip().lower()
        return 415, f"Content-Type {shown(main)} is not accepted here: send a JSON object as application/json"
    if kind in ("model_attributes_type", "dict_type"):
        return 422, "the request body must be a JSON object"
    return None


async def _unparsable_body(request: Request) -> str:
    """What is wrong with a body FastAPI could not parse (it says only that it could not)."""
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the request body is not valid UTF-8 (byte {exc.start})"
    try:
        json.loads(text)
    except ValueError as exc:      # e.g. an integer literal longer than Python converts (4,300 digits)
        return f"the request body is not valid JSON: {exc}"
    return "the request body could not be parsed"


def install(app: FastAPI) -> None:
    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError):
        # no device slot now (an admin load, vLLM's load_lora_adapter): a turn to come back for, as the 429s say
        return _respond(request, exc.status, str(exc), {"Retry-After": "1"} if isinstance(exc, Unavailable) else None)

    @app.exception_handler(ac.AdapterError)
    async def adapter_error(request: Request, exc: ac.AdapterError):
        return _respond(request, 404 if isinstance(exc, ac.UnknownAdapterError) else 422, str(exc))

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError):
        return _respond(request, 429, f"the server is busy: {exc}", {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if len(errors) == 1 and tuple(errors[0]["loc"]) == ("body",):     # the body as a whole
            whole = _whole_body_problem(request, errors[0].get("type"))
            if whole is not None:
                return _respond(request, *whole)
        parts = [("the request body is not valid JSON" if e.get("type") == "json_invalid" else
                  f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {_MESSAGES.get(e.get('type'), e['msg'])}")
                 for e in errors]
        return _respond(request, 422, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message, headers = str(exc.detail), getattr(exc, "headers", None)
        if exc.status_code == 405:
            allowed = (headers or {}).get("Allow") or (headers or {}).get("allow")
            message = f"method {request.method} is not allowed on {request.url.path}" + (
                f" (allowed: {allowed})" if allowed else "")
        elif exc.status_code == 400 and message == "There was an error parsing the body":     # FastAPI's words
            message = await _unparsable_body(request)
        return _respond(request, exc.status_code, message, headers)

    @app.exception_handler(ChatTemplateBroken)          # the server's template, not the request: a 500
    async def broken_template(request: Request, exc: ChatTemplateBroken):
        return _respond(request, 500, str(exc))

    for kind, (status, say) in INPUT_ERRORS.items():
        async def handler(request: Request, exc: Exception, status=status, say=say):
            return _respond(request, status, say(exc))
        app.add_exception_handler(kind, handler)

    document(app)


def document(app: FastAPI) -> None:
    """Declare the error responses of every route in the app's OpenAPI document (OpenAI's shape; TGI's on its
    routes)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            bodies = {}
            for shape in (ErrorResponse, TgiErrorResponse):
                model = shape.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model.pop("$defs", {}))
                components[shape.__name__] = model
                bodies[shape] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape.__name__}"}}}
            for path, operations in schema.get("paths", {}).items():
                body = bodies[TgiErrorResponse if path in TGI_PATHS else ErrorResponse]
                for operation in operations.values():
                    for status in OPERATION_ERRORS.get(path, API_ERRORS):
                        operation.setdefault("responses", {})[str(status)] = {
                            "description": TYPES[status].replace("_", " "), "content": body}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
