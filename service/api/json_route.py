"""`JsonRoute`: the route class of every API router; it checks what FastAPI would otherwise ignore or misread.

FastAPI reads a route's body and hands it to `json.loads` when it has no content type or a JSON one
(`application/json`, `application/*+json`); this class does the same test, reads the body first (FastAPI
then reuses it) and refuses one nesting deeper than `MAX_JSON_DEPTH` with a 422 (`TooDeep`, answered by
`errors.install`), so the parser never recurses a thousand frames deep on a hostile body. It also refuses, before
the handler runs, what FastAPI would silently drop: a query parameter the route does not declare (422 naming
it and the ones it takes) and a compressed body (`Content-Encoding` other than identity: 415; the body would
be read as if plain).
"""

from __future__ import annotations

import email.message
from typing import Callable

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute

from service.json_nesting import check_depth

from .errors import shown


class JsonRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        accepted = _query_names(self.dependant)

        async def bounded(request: Request) -> Response:
            unknown = next((key for key in request.query_params if key not in accepted), None)
            if unknown is not None:
                takes = f"it takes {', '.join(accepted)}" if accepted else "it takes none"
                raise HTTPException(422, f"query parameter {shown(unknown)} is not supported by {request.url.path} "
                                         f"({takes})")
            encoding = request.headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                raise HTTPException(415, f"Content-Encoding {shown(encoding)} is not supported: send the body "
                                         "uncompressed")
            if request.method not in ("GET", "HEAD", "OPTIONS") and json_body(request):
                body = await request.body()
                if body:
                    check_depth(body)
            return await handler(request)

        return bounded


def _query_names(dependant) -> list[str]:
    """The query parameters a route declares, its dependencies' included."""
    names, pending = set(), [dependant]
    while pending:
        current = pending.pop()
        names.update(param.alias for param in current.query_params)
        pending.extend(current.dependencies)
    return sorted(names)


def json_body(request: Request) -> bool:
    """Whether FastAPI would parse this request's body as JSON (its own test of the content type)."""
    value = request.headers.get("content-type")
    if not value:
        return True
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))
