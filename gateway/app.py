"""build_app: the OpenAI-compatible Starlette app around a BusClient it is given (it does not own it)."""

from __future__ import annotations

import hmac
import logging
import time

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from bus import BusClient, BusError
from bus import bind_log_fields as bind
from gateway.config import GatewayConfig
from gateway.context import RequestContext
from gateway.errors import ApiError
from gateway.http import error_response
from gateway.metrics import HttpMetrics, metrics
from gateway.operations import GatewayOps
from gateway.routes_generate import chat_completions, completions, resume_chat, resume_completion
from gateway.routes_info import embeddings, health, list_models, model_detail, token_check
from gateway.routes_responses import responses

__all__ = ["build_app"]

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
RATE_LIMIT_HEADERS = [
    f"x-ratelimit-{w}-{k}" for k in ("requests", "tokens") for w in ("limit", "remaining", "reset")
]


class ApiKeyAuth:
    """Every path but /health (and CORS preflights) needs `Authorization: Bearer <key>` when keys are set:
    the gateway's static keys, or managed keys (`chatbus keys`) once any exists on the bus. A managed
    key's record goes to the request's state as `api_key` (limits and usage, gateway/keys.py)."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], ops: GatewayOps) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.ops = ops

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # compare_digest against every key, so timing does not tell which one nearly matched
        if given and sum(hmac.compare_digest(given, k) for k in self.keys) > 0:
            bind(key="static")
            await self.app(scope, receive, send)
            return
        store = self.ops.keys if await self.ops.ready() else None
        record = store.lookup(given.decode(errors="replace")) if store is not None and given else None
        if record is not None and record.usable(time.time()):
            scope.setdefault("state", {})["api_key"] = record
            bind(key=record.name)
            await self.app(scope, receive, send)
            return
        if not self.keys and (store is None or not store.active):
            await self.app(scope, receive, send)  # an open gateway
            return
        if record is not None:
            message = (
                f"API key {record.name!r} was {'revoked' if record.revoked else 'valid until it expired'}"
            )
        elif not token:
            message = "missing API key: send 'Authorization: Bearer <key>'"
        else:
            message = "invalid API key: it is not a gateway key (--api-key) nor a live `chatbus keys` key"
        response = error_response(ApiError(401, message, code="invalid_api_key"))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


async def _on_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = f"{exc.detail}: {request.method} {request.url.path}; see docs/api.md for the endpoints"
        return error_response(ApiError(exc.status_code, detail, code=kind))
    if not isinstance(exc, ApiError | BusError):
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(exc)


def build_app(client: BusClient, config: GatewayConfig | None = None) -> Starlette:
    config = config or GatewayConfig()
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model_detail, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/chat/completions/{completion_id}/stream", resume_chat, methods=["GET"]),
        Route("/v1/completions/{completion_id}/stream", resume_completion, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/api/v1/token_check", token_check, methods=["POST"]),
        Route("/v1/token_check", token_check, methods=["POST"]),
    ]
    ops = GatewayOps(client)
    middleware = [Middleware(RequestContext), Middleware(HttpMetrics, metrics=ops.metrics)]
    if config.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(config.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=["Retry-After", "X-Request-ID", *RATE_LIMIT_HEADERS],
            )
        )
    middleware.append(Middleware(ApiKeyAuth, keys=config.api_keys, ops=ops))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            HTTPException: _on_error,
            ApiError: _on_error,
            BusError: _on_error,
            Exception: _on_error,
        },
    )
    app.state.client = client
    app.state.config = config
    app.state.ops = ops
    return app
