"""Small HTTP helpers shared by the routes: bounded body reads, JSON replies, bus and payload checks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from bus import BusClient, BusUnavailable, encode
from gateway.errors import ApiError, error_reply

__all__ = [
    "check_bus",
    "check_payload",
    "error_response",
    "json_response",
    "read_body",
    "unless_disconnected",
]

T = TypeVar("T")
_HEADROOM = 1024  # NATS headers and the reply subject travel with the payload


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status, headers, media_type="application/json")


def error_response(exc: BaseException, *, param: str | None = None) -> Response:
    reply = error_reply(exc, param=param)
    return json_response(reply.body, reply.status, reply.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it grows past `limit` bytes."""

    def too_large(size: int | str) -> ApiError:
        return ApiError(
            413,
            f"request body is {size} bytes, over this gateway's limit of {limit} bytes "
            f"(--max-body-bytes); send a shorter prompt",
            code="request_too_large",
        )

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {size}")
        chunks.append(chunk)
    return b"".join(chunks)


def check_bus(client: BusClient) -> None:
    """503 at once when NATS is down (instead of waiting for a request timeout)."""
    if not client.connected:
        raise BusUnavailable(
            "the gateway has lost its NATS connection and is reconnecting; retry shortly "
            "(is nats-server running?)"
        )


def check_payload(client: BusClient, message: msgspec.Struct, param: str) -> None:
    """413 for a request the bus cannot carry in one message (NATS max_payload)."""
    size = len(encode(message))
    limit = client.max_payload - _HEADROOM
    if size > limit:
        raise ApiError(
            413,
            f"{param} is too large for the bus: the request encodes to {size} bytes and NATS carries at "
            f"most {limit} bytes per message (server max_payload); shorten it, or raise max_payload "
            f"on the NATS server",
            code="request_too_large",
            param=param,
        )


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client hangs up first, cancel it (its cleanup cancels the node) and return None."""
    task = asyncio.ensure_future(work)

    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hangup())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.cancelled() or not watcher.done():
            raise
        return None
