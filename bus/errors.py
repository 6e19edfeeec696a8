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
    "JobCancelled",
    "ModelLoadError",
    "ModelNotFound",
    "NoNodeAvailable",
    "NodeBusy",
    "NodeTimeout",
    "Unsupported",
    "error_for",
]


class Code(str, Enum):
    """The wire code of an error: what `Failed.code` and `Rejected.code` carry."""

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
    """Base of every chatbus error; `code` is what goes on the wire (`Failed.code`, `Rejected.code`).

    Catch this to handle any chatbus failure; the message is one line meant for the user.
    """

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadMessage(BusError):
    """Bytes on the bus did not decode as the expected message, or carry a newer wire version.

    Raised by `bus.codec.decode`; the sender runs another chatbus release or is not chatbus at all:
    upgrade the older side (the message says which version each speaks).
    """

    code = Code.BAD_REQUEST


class BadRequest(BusError):
    """A request no node could honour as asked (a parameter out of range, an empty prompt, ...).

    Raised by a node (it travels back as `Rejected`) or by a client before sending; the message names
    the field: fix that field and send again. The gateway answers it with HTTP 400.
    """

    code = Code.BAD_REQUEST


class InvalidName(BadRequest, ValueError):
    """A name that cannot go on the bus (empty, too long, control characters); `field` says which.

    Raised by `bus.subjects.check_name` before a name becomes a subject token: choose another name.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthExceeded(BadRequest):
    """The prompt plus `max_tokens` does not fit the model's context: shorten the prompt or ask for fewer tokens."""

    code = Code.CONTEXT_LENGTH


class Unsupported(BadRequest):
    """A request this node cannot honour as asked (an unknown constraint kind or version, ...).

    Raised by a node; send it to a node that supports the feature, or drop the feature from the request.
    """

    code = Code.UNSUPPORTED


class ModelNotFound(BusError):
    """No node on the bus serves `model`; the message lists what is served.

    Raised by `BusClient` when routing; start a node with that model or pick one of `served`.
    """

    code = Code.MODEL_NOT_FOUND

    def __init__(self, model: str, served: list[str]) -> None:
        listing = ", ".join(sorted(served)) or "none (is a node running?)"
        shown = repr(model) if len(model) <= 100 else f"{model[:100]!r}... ({len(model)} characters)"
        super().__init__(f"model {shown} is not served on the bus; served models: {listing}")
        self.model = model
        self.served = served


class NodeBusy(BusError):
    """Every node that serves the model refused the request for capacity.

    Raised by `BusClient` after its retries; wait `retry_after_s` and try again, or start another node.
    """

    code = Code.BUSY

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoNodeAvailable(BusError):
    """The model is known but no live node could take the request (all gone or unreachable).

    Raised by `BusClient` when routing or failing over; check that a node for the model is running.
    """

    code = Code.NO_NODE


class NodeTimeout(BusError):
    """A node did not answer (accept, reply or the next token) within its deadline.

    Raised by `BusClient`; the node may be overloaded or gone: retry, or raise the timeout.
    """

    code = Code.TIMEOUT


class Cancelled(BusError):
    """The generation was cancelled on its node before it finished (by the asker, or a node shutting down).

    Nothing to fix when the asker cancelled; otherwise retry.
    """

    code = Code.CANCELLED


class JobCancelled(Cancelled):
    """Raised inside a job handler (by `JobContext.check_cancelled`) when the job was cancelled or its
    worker is stopping; the handler lets it propagate and `JobWorker` records or hands back the job."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class BusUnavailable(BusError):
    """The NATS server cannot be reached (or refused the credential).

    Raised by `bus.connect` and by `BusClient` calls; start the bus (`chatbus up`) or check `--nats`.
    """

    code = Code.BUS_UNAVAILABLE


class ModelLoadError(BusError):
    """A model (or a training base) could not be loaded; raised by `node.loader` at startup.

    The message is one line saying what to do instead (another dtype, a quantization extra, a path).
    """


class GenerationFailed(BusError):
    """A node reported `Failed` (or vanished) and no failover could finish the answer.

    `code` is the node's wire code; the message is the node's. Retry, or read the node's log.
    """

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
