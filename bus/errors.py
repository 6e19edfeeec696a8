"""The small error tree every component speaks; `code` travels on the wire in `Failed`/`Rejected`."""

from __future__ import annotations

from enum import Enum

__all__ = [
    "BadMessage",
    "BadRequest",
    "BusError",
    "BusUnavailable",
    "Cancelled",
    "Code",
    "ContextLengthExceeded",
    "GenerationFailed",
    "InvalidName",
    "ModelNotFound",
    "NoNodeAvailable",
    "NodeBusy",
    "NodeTimeout",
    "Unsupported",
    "error_for",
]


class Code(str, Enum):
    BAD_REQUEST = "bad_request"
    CONTEXT_LENGTH = "context_length_exceeded"
    MODEL_NOT_FOUND = "model_not_found"
    BUSY = "busy"
    NO_NODE = "no_node"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    NODE_LOST = "node_lost"
    STREAM_GAP = "stream_gap"
    INTERNAL = "internal"
    SHUTTING_DOWN = "shutting_down"
    BUS_UNAVAILABLE = "bus_unavailable"
    UNSUPPORTED = "unsupported"


class BusError(Exception):
    """Base of every chatbus error; `code` is what goes on the wire."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadMessage(BusError):
    code = Code.BAD_REQUEST


class BadRequest(BusError):
    code = Code.BAD_REQUEST


class InvalidName(BadRequest, ValueError):
    """A name that cannot go on the bus (empty, too long, control characters); `field` says which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthExceeded(BadRequest):
    code = Code.CONTEXT_LENGTH


class Unsupported(BadRequest):
    """A request this node cannot honour as asked (an unknown constraint kind or version, ...)."""

    code = Code.UNSUPPORTED


class ModelNotFound(BusError):
    code = Code.MODEL_NOT_FOUND

    def __init__(self, model: str, served: list[str]) -> None:
        listing = ", ".join(sorted(served)) or "none (is a node running?)"
        shown = repr(model) if len(model) <= 100 else f"{model[:100]!r}... ({len(model)} characters)"
        super().__init__(f"model {shown} is not served on the bus; served models: {listing}")
        self.model = model
        self.served = served


class NodeBusy(BusError):
    code = Code.BUSY

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoNodeAvailable(BusError):
    code = Code.NO_NODE


class NodeTimeout(BusError):
    code = Code.TIMEOUT


class Cancelled(BusError):
    code = Code.CANCELLED


class BusUnavailable(BusError):
    code = Code.BUS_UNAVAILABLE


class GenerationFailed(BusError):
    """A node reported `Failed` (or vanished) and no failover could finish the answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        try:
            self.code = Code(code)
        except ValueError:
            self.code = Code.INTERNAL


_BY_CODE: dict[Code, type[BusError]] = {
    Code.BAD_REQUEST: BadRequest,
    Code.CONTEXT_LENGTH: ContextLengthExceeded,
    Code.BUSY: NodeBusy,
    Code.NO_NODE: NoNodeAvailable,
    Code.TIMEOUT: NodeTimeout,
    Code.CANCELLED: Cancelled,
    Code.BUS_UNAVAILABLE: BusUnavailable,
    Code.UNSUPPORTED: Unsupported,
}


def error_for(code: str, message: str) -> BusError:
    """The typed exception for a wire `code` (as found in `Failed` or `Rejected`)."""
    try:
        cls = _BY_CODE.get(Code(code))
    except ValueError:
        cls = None
    if cls is None:
        return GenerationFailed(code, message)
    return cls(message)
