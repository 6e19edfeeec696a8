"""OpenAI error envelopes: the gateway's own ApiError and the one mapping from bus exceptions."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from bus import (
    BadMessage,
    BadRequest,
    BusError,
    BusUnavailable,
    Cancelled,
    Code,
    ContextLengthExceeded,
    GenerationFailed,
    InvalidName,
    ModelNotFound,
    NodeBusy,
    NodeTimeout,
    NoNodeAvailable,
)

__all__ = ["ApiError", "ErrorReply", "error_reply"]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the gateway itself detects (bad body, bad key, too large, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


@dataclass(frozen=True)
class ErrorReply:
    """What to answer: HTTP status, the OpenAI envelope, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _envelope(message: str, type_: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Failures reported by a node mid-generation (GenerationFailed carries a wire code).
_FAILED_STATUS: dict[Code, tuple[int, str]] = {
    Code.NODE_LOST: (503, "service_unavailable"),
    Code.SHUTTING_DOWN: (503, "service_unavailable"),
    Code.CANCELLED: (503, "service_unavailable"),
    Code.TIMEOUT: (504, "timeout"),
    Code.BUS_UNAVAILABLE: (503, "service_unavailable"),
    Code.NO_NODE: (503, "service_unavailable"),
}


def error_reply(exc: BaseException, *, param: str | None = None) -> ErrorReply:
    """The one place any exception becomes an OpenAI error (status, envelope, headers)."""
    if isinstance(exc, ApiError):
        return ErrorReply(exc.status, _envelope(exc.message, exc.type, exc.code, exc.param), exc.headers)
    if isinstance(exc, ModelNotFound):
        return ErrorReply(404, _envelope(exc.message, "invalid_request_error", "model_not_found", "model"))
    if isinstance(exc, ContextLengthExceeded):
        return ErrorReply(
            400,
            _envelope(
                f"{exc.message}; shorten the prompt or lower max_tokens",
                "invalid_request_error",
                "context_length_exceeded",
                param or "messages",
            ),
        )
    if isinstance(exc, InvalidName):
        return ErrorReply(400, _envelope(exc.message, "invalid_request_error", "invalid_value", exc.field))
    if isinstance(exc, BadRequest | BadMessage):
        return ErrorReply(400, _envelope(exc.message, "invalid_request_error", "invalid_request", param))
    if isinstance(exc, NodeBusy):
        retry = max(1, math.ceil(exc.retry_after_s))
        return ErrorReply(
            429,
            _envelope(
                f"{exc.message}; every node serving this model is at capacity, retry in {retry}s",
                "rate_limit_error",
                "rate_limit_exceeded",
                None,
            ),
            {"Retry-After": str(retry)},
        )
    if isinstance(exc, NoNodeAvailable):
        return ErrorReply(503, _envelope(exc.message, "service_unavailable", "no_node_available", None))
    if isinstance(exc, BusUnavailable):
        return ErrorReply(503, _envelope(exc.message, "service_unavailable", "bus_unavailable", None))
    if isinstance(exc, NodeTimeout):
        return ErrorReply(504, _envelope(exc.message, "timeout", "timeout", None))
    if isinstance(exc, Cancelled):
        return ErrorReply(503, _envelope(exc.message, "service_unavailable", "cancelled", None))
    if isinstance(exc, GenerationFailed | BusError):
        status, type_ = _FAILED_STATUS.get(exc.code, (500, "server_error"))
        return ErrorReply(status, _envelope(exc.message, type_, exc.code.value, None))
    log.error("unexpected error", exc_info=exc)
    return ErrorReply(
        500,
        _envelope(
            f"internal gateway error ({type(exc).__name__}: {exc}); see the gateway log",
            "server_error",
            "internal_error",
            None,
        ),
    )
