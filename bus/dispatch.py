"""Find a node that accepts a generation request: the nodes the table names by load, then the queue group.

`StreamHost` is what a ChatStream (and this module) may use of the client that made it; `BusClient` is
one. Neither this module nor bus/stream.py imports the client, so the two have no import circle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus import subjects
from bus.codec import decode, encode
from bus.connection import HEARTBEAT_S, cancel_and_wait
from bus.errors import (
    BadMessage,
    BadRequest,
    BusUnavailable,
    Code,
    GenerationFailed,
    ModelNotFound,
    NodeBusy,
    NodeTimeout,
    NoNodeAvailable,
    error_for,
)
from bus.schemas import Accepted, Cancel, GenerateReply, GenerateRequest, Rejected

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

    from bus.nodes import NodeTable

__all__ = ["StreamHost", "dispatch"]

log = logging.getLogger(__name__)

_ACCEPT_S_PER_MIB = 5.0  # more time to accept per MiB of a prompt sent by reference (read, counted)


class StreamHost(Protocol):
    """What a ChatStream needs of its client: the connection, the node table, its timeouts, and a
    place to list the streams that are live (the client sends their keep-alives)."""

    nc: NATS
    js: JetStreamContext
    table: NodeTable
    accept_timeout_s: float
    probe_timeout_s: float
    stall_check_s: float
    keepalive_s: float

    @property
    def connected(self) -> bool: ...

    @property
    def max_payload(self) -> int: ...

    def reconnects(self) -> int: ...

    def prefixes_for(self, request: GenerateRequest) -> list[int]: ...

    def track(self, stream: Any) -> None: ...

    def untrack(self, stream: Any) -> None: ...


async def dispatch(
    host: StreamHost,
    request: GenerateRequest,
    exclude: set[str],
    *,
    failover: bool = False,
    stream_id: str = "",
    abandoned: set[str] | None = None,
) -> tuple[GenerateRequest, Accepted]:
    """Find a node that accepts `request`: the request as sent (a fresh attempt id after a silent
    node) and the node's `Accepted`. Raises the typed error of why none did.

    `failover=True` skips the queue group (any node, even one we no longer hear from: a failover
    must not land on the hung node it is fleeing, which still holds its subscriptions), and a
    node that does not answer within a few heartbeats (hung too, not yet expired from the node
    table) is passed over instead of ending the answer. An attempt id given up on goes into
    `abandoned`, and the next attempt gets a fresh id made from `stream_id` (the answer's first id).
    """
    table = host.table
    for value, what in ((request.model, "model"), (request.request_id, "request_id")):
        subjects.check_name(value, what)  # before anything goes on the wire
    if not host.connected:
        raise BusUnavailable(
            "the NATS server is unreachable right now; chatbus reconnects by itself, retry shortly"
        )
    payload = encode(request)
    if len(payload) > host.max_payload:
        raise BadRequest(
            f"the request encodes to {len(payload)} bytes even without its prompt, over the "
            f"{host.max_payload} bytes one NATS message may carry (server max_payload)"
        )
    busy: NodeBusy | None = None
    silent: NodeTimeout | None = None
    timeout = min(host.accept_timeout_s, 2 * HEARTBEAT_S) if failover else host.accept_timeout_s
    if request.prompt_ref is not None:  # the node reads and counts a large prompt before it answers
        timeout += _ACCEPT_S_PER_MIB * request.prompt_ref.size / 2**20
    targets = [
        (n.node_id, subjects.gen_node(request.model, n.node_id))
        for n in table.candidates(request.model, exclude, host.prefixes_for(request))
    ]
    if not failover:  # last, the queue group: any node we have not heard of yet
        targets.append(("", subjects.gen(request.model)))
    for node_id, subject in targets:
        table.note_dispatch(node_id, +1)  # before the request, so a concurrent burst spreads out
        # A named node admits from its event loop within milliseconds, even when busy: one
        # that does not within a couple of probe timeouts hangs, and the next one is asked.
        quick = node_id and request.prompt_ref is None
        wait = min(timeout, 2 * host.probe_timeout_s) if quick else timeout
        try:
            msg = await _request(host, subject, payload, wait)
        except NoRespondersError:
            table.note_dispatch(node_id, -1)
            continue
        except NatsTimeout:
            table.note_dispatch(node_id, -1)
            silent = NodeTimeout(f"no node answered for model {request.model!r} within {wait:.0f}s")
            if node_id:  # it may wake up and take this id: the next node gets a fresh one
                if abandoned is not None:
                    abandoned.add(request.request_id)
                request = await _abandon(host, node_id, request, stream_id or request.request_id)
                payload = encode(request)
            if node_id or failover:
                continue
            raise silent from None
        try:
            reply: Accepted | Rejected = decode(msg.data, GenerateReply)
        except BadMessage as e:
            table.note_dispatch(node_id, -1)
            raise GenerationFailed(
                Code.INTERNAL.value, f"a node answered {subject} with an unreadable reply: {e}"
            ) from None
        if isinstance(reply, Rejected):
            table.note_dispatch(node_id, -1)
            if reply.code == Code.BUSY.value:
                busy = NodeBusy(reply.message, reply.retry_after_s or 1.0)
                exclude.add(reply.node_id)
                continue
            raise error_for(reply.code, reply.message)
        return request, reply
    error = busy or silent
    if error is not None:
        raise error
    served = list(table.models())
    if request.model in served or failover:
        raise NoNodeAvailable(f"every node serving {request.model!r} is gone or draining; try again shortly")
    raise ModelNotFound(request.model, served)


async def _abandon(
    host: StreamHost, node_id: str, request: GenerateRequest, stream_id: str
) -> GenerateRequest:
    """`request` under a fresh attempt id, after `node_id` did not answer it: two nodes must
    never write one token stream. The silent node is told to cancel, for when it wakes up."""
    with contextlib.suppress(Exception):
        await host.nc.publish(subjects.ctl(node_id), encode(Cancel(request_id=request.request_id)))
    base = stream_id[: subjects.MAX_NAME_BYTES // 2]
    return msgspec.structs.replace(request, request_id=f"{base}-s{secrets.token_hex(3)}")


async def _request(host: StreamHost, subject: str, payload: bytes, timeout: float) -> Msg:
    """One core request, sent again at once if the connection is re-established meanwhile (what
    was in flight is lost then; a node takes a repeated request id as the same request). Only
    once: a request that loses the connection twice may be what the server closes it for."""
    deadline = time.monotonic() + timeout
    for _ in range(2):
        reconnects = host.reconnects()
        left = max(0.01, deadline - time.monotonic())
        request = asyncio.ensure_future(host.nc.request(subject, payload, timeout=left))
        while not request.done() and host.reconnects() == reconnects:
            await asyncio.wait({request}, timeout=0.2)
        if request.done():
            return request.result()
        await cancel_and_wait(request)
        log.info("connection re-established during a request to %s: sending it again", subject)
    raise BusUnavailable(f"the NATS connection dropped twice while asking {subject[:80]}; retry shortly")
