"""`RequestContext`: the outermost ASGI middleware of the app. It gives every HTTP request an id (the client's
`X-Request-ID` when it is a short token, else a new one), sends it back in the `X-Request-ID` header of every
response and in the body of every error (`errors.request_id`), names the replica that answered in `X-Replica`
(`Settings.replica_name`: the host name unless set, so a pod's name under Kubernetes and the Serve replica's id
under Ray; routing across replicas can be observed from the client), and turns an exception nothing else handled
into a 500 in the error shape, logged with that id and the traceback, so a client can quote the id and an
operator can find the fault. Input errors never get here: `errors.install` maps them to 4xx. A failure after a
response has started (a stream cut mid-way) can only be logged: the connection is then closed, which is how
the client learns that the response is incomplete. Every 4xx / 5xx response, whoever made it, is also noted in
the app's `RecentErrors` (status, method, path, its message, the id) for the console's live view.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response, request_id

log = logging.getLogger("adapter_serve")
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
HEADER = b"x-request-id"
REPLICA_HEADER = b"x-replica"
MAX_ERROR_BODY = 16384       # an error body is at most a few KB (errors.MAX_MESSAGE); a larger one is not parsed


class RequestContext:
    def __init__(self, app: ASGIApp, replica: str = ""):
        self.app = app
        self.replica = replica.encode("ascii", "replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(HEADER, b"")
        rid = given.decode() if _CLIENT_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = False
        status, body = 200, b""

        async def send_with_id(message: Message) -> None:
            nonlocal started, status, body
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                ours = [(HEADER, rid.encode()), (REPLICA_HEADER, self.replica)]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in (HEADER, REPLICA_HEADER)]
                message = {**message, "headers": headers + ours}
            elif message["type"] == "http.response.body" and status >= 400:
                body += message.get("body", b"")[:MAX_ERROR_BODY - len(body)]
                if not message.get("more_body", False):
                    _note(scope, status, _message(body), rid)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if started:
                _note(scope, None, "the response failed after it had started (see the server log)", rid)
                raise
            await error_response(500, f"internal server error (request id {rid})")(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


def _message(body: bytes) -> str:
    """The message of an error body in OpenAI's shape (or the body's start, if it is something else)."""
    try:
        error = json.loads(body)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body[:256].decode("utf-8", "replace")


def _note(scope: Scope, status: int, message: str, rid: Optional[str]) -> None:
    state = getattr(getattr(scope.get("app"), "state", None), "serving", None)
    if state is not None:
        state.metrics.recent_errors.add(status, message, scope.get("method", ""), scope.get("path", ""), rid)
