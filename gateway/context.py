"""Each request's id (the client's X-Request-ID, or a new one) in the response headers and log context."""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bus import bind_log_fields as bind

__all__ = ["RequestContext", "request_id"]

_SAFE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")  # what a header may carry into logs and the bus


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


class RequestContext:
    """Outermost: take a well-formed X-Request-ID (else make one), bind it for the logs, send it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        rid = given if _SAFE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        bind(request_id=rid, key="", model="")

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        await self.app(scope, receive, sending)
