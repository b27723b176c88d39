"""`RequestContext`: the outermost ASGI middleware of the app. It gives every HTTP request an id (the client's
`X-Request-ID` when it is a short token, else a new one), sends it back in the `X-Request-ID` header of every
response and in the body of every error (`errors.request_id`), names the replica that answered in `X-Replica`
(`Settings.replica_name`: the host name unless set, so a pod's name under Kubernetes and the Serve replica's id
under Ray; routing across replicas can be observed from the client), and turns an exception nothing else handled
into a 500 in the error shape, logged with that id and the traceback, so a client can quote the id and an
operator can find the fault. Input errors never get here: `errors.install` maps them to 4xx. A failure after a
response has started (a stream cut mid-way) can only be logged: the connection is then closed, which is how
the client learns that the response is incomplete.
"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response, request_id

log = logging.getLogger("adapter_serve")
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
HEADER = b"x-request-id"
REPLICA_HEADER = b"x-replica"


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

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                ours = [(HEADER, rid.encode()), (REPLICA_HEADER, self.replica)]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in (HEADER, REPLICA_HEADER)]
                message = {**message, "headers": headers + ours}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if started:
                raise
            await error_response(500, f"internal server error (request id {rid})")(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
