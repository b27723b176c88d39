"""`JsonRoute`: the route class of every API router; it measures a JSON body's nesting before FastAPI parses it.

FastAPI reads a route's body and hands it to `json.loads` when it has no content type or a JSON one
(`application/json`, `application/*+json`); this class does the same test, reads the body first (FastAPI
then reuses it) and refuses one nesting deeper than `MAX_JSON_DEPTH` with a 422 (`TooDeep`, answered by
`errors.install`), so the parser never recurses a thousand frames deep on a hostile body.
"""

from __future__ import annotations

import email.message
from typing import Callable

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.json_nesting import check_depth


class JsonRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            if request.method not in ("GET", "HEAD", "OPTIONS") and _json_body(request):
                body = await request.body()
                if body:
                    check_depth(body)
            return await handler(request)

        return bounded


def _json_body(request: Request) -> bool:
    """Whether FastAPI would parse this request's body as JSON (its own test of the content type)."""
    value = request.headers.get("content-type")
    if not value:
        return True
    message = email.message.Message()
    message["content-type"] = value
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))
