"""One generation as the caller sees it: dispatch, token stream, cancel, failover.

The caller gets one continuous stream of `Chunk` events ending in exactly one `Done` or `Failed`,
even when the node that started the answer dies: the text so far is re-dispatched to another node
as a `continuation` (bounded attempts) and the new node's chunks are renumbered to follow on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import DeliverPolicy

from bus import subjects
from bus.codec import decode, encode
from bus.errors import (
    BusError,
    BusUnavailable,
    Code,
    ModelNotFound,
    NodeBusy,
    NodeTimeout,
    NoNodeAvailable,
    error_for,
)
from bus.schemas import (
    Accepted,
    Cancel,
    Chunk,
    Done,
    Failed,
    GenerateReply,
    GenerateRequest,
    Rejected,
    StreamEvent,
    Usage,
)

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from bus.client import BusClient

__all__ = ["ChatStream"]

log = logging.getLogger(__name__)

# Failures after which the answer may continue on another node.
_FAILOVER_CODES = {Code.NODE_LOST.value, Code.SHUTTING_DOWN.value, Code.STREAM_GAP.value}


class ChatStream(AsyncIterator[StreamEvent]):
    """`await start()` raises typed errors before any event (handy for HTTP status codes);
    iterating starts it implicitly. `aclose()` cancels an unfinished generation on the node."""

    def __init__(self, client: BusClient, request: GenerateRequest, max_failovers: int) -> None:
        self._client = client
        self.request = request
        self.request_id = request.request_id
        self.node_id = ""
        self.prompt_tokens = 0
        self.nodes_used: list[str] = []
        self._max_failovers = max_failovers
        self._sub: JetStreamContext.PushSubscription | None = None
        self._started = False
        self._finished = False
        self._attempt_rid = request.request_id
        self._last_seq = 0  # within the current attempt
        self._out_seq = 0  # as the caller sees it
        self._text: list[str] = []
        self._completion_tokens = 0
        self._last_event_at = 0.0
        self._reconnects = 0

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def finished(self) -> bool:
        return self._finished

    # ------------------------------------------------------------------ dispatch

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            await self._dispatch(self.request, exclude=set())
        except BaseException:
            self._finished = True
            raise

    async def _dispatch(self, request: GenerateRequest, exclude: set[str]) -> None:
        """Find a node that accepts `request` and subscribe to its token stream."""
        table = self._client.table
        if not self._client.connected:
            raise BusUnavailable(
                "the NATS server is unreachable right now; chatbus reconnects by itself, retry shortly"
            )
        payload = encode(request)
        busy: NodeBusy | None = None
        targets = [
            (n.node_id, subjects.gen_node(request.model, n.node_id))
            for n in table.candidates(request.model, exclude)
        ]
        # Last, the queue group: any node we have not heard of yet.
        targets.append(("", subjects.gen(request.model)))
        for node_id, subject in targets:
            table.note_dispatch(node_id, +1)  # before the request, so a concurrent burst spreads out
            try:
                msg = await self._client.nc.request(subject, payload, timeout=self._client.accept_timeout_s)
            except NoRespondersError:
                table.note_dispatch(node_id, -1)
                continue
            except NatsTimeout:
                table.note_dispatch(node_id, -1)
                raise NodeTimeout(
                    f"no node answered for model {request.model!r} within {self._client.accept_timeout_s:.0f}s"
                ) from None
            reply: Accepted | Rejected = decode(msg.data, GenerateReply)
            if isinstance(reply, Rejected):
                table.note_dispatch(node_id, -1)
                if reply.code == Code.BUSY.value:
                    busy = NodeBusy(reply.message, reply.retry_after_s or 1.0)
                    exclude.add(reply.node_id)
                    continue
                raise error_for(reply.code, reply.message)
            await self._accepted(request, reply)
            return
        if busy is not None:
            raise busy
        served = list(table.models())
        if request.model in served:
            raise NoNodeAvailable(
                f"every node serving {request.model!r} is gone or draining; try again shortly"
            )
        raise ModelNotFound(request.model, served)

    async def _accepted(self, request: GenerateRequest, reply: Accepted) -> None:
        self.node_id = reply.node_id
        self.nodes_used.append(reply.node_id)
        if not self.prompt_tokens:
            self.prompt_tokens = reply.prompt_tokens
        self._attempt_rid = request.request_id
        self._last_seq = 0
        self._last_event_at = time.monotonic()
        await self._subscribe()
        self._client._register(self)

    async def _subscribe(self) -> None:
        """(Re)subscribe to this attempt's token stream from its start; seen events are skipped."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._reconnects = self._client.reconnects()
        self._sub = await self._client.js.subscribe(
            subjects.token(self._attempt_rid),
            stream=subjects.TOKENS_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if not self._started:
            await self.start()
        while not self._finished:
            event = await self._next_event()
            if isinstance(event, Chunk):
                self._text.append(event.text)
                self._completion_tokens += event.tokens
                self._out_seq += 1
                return msgspec.structs.replace(event, seq=self._out_seq)
            if isinstance(event, Done):
                await self._finish()
                self._out_seq += 1
                usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self._completion_tokens)
                return msgspec.structs.replace(event, seq=self._out_seq, usage=usage)
            if event.code in _FAILOVER_CODES and await self._failover(event.message, event.code):
                continue
            await self._finish()
            self._out_seq += 1
            return msgspec.structs.replace(event, seq=self._out_seq)
        raise StopAsyncIteration

    async def _next_event(self) -> StreamEvent:
        """The next event of this attempt; a silent, vanished node becomes Failed(node_lost)."""
        while True:
            assert self._sub is not None
            try:
                msg = await self._sub.next_msg(timeout=self._client.stall_check_s)
            except NatsTimeout:
                if self._client.reconnects() != self._reconnects:
                    with contextlib.suppress(Exception):  # the server restarted: resume from the record
                        await self._subscribe()
                    continue
                if self._client.table.is_alive(self.node_id):
                    continue
                silent = time.monotonic() - self._last_event_at
                return Failed(
                    seq=self._last_seq + 1,
                    code=Code.NODE_LOST.value,
                    message=f"node {self.node_id} stopped heartbeating ({silent:.1f}s without tokens)",
                    node_id=self.node_id,
                )
            event: StreamEvent = decode(msg.data, StreamEvent)
            if event.seq <= self._last_seq:
                continue  # a redelivery after a consumer reset
            if event.seq > self._last_seq + 1:  # tokens were lost (a server restart): continue elsewhere
                await self.cancel()
                return Failed(
                    seq=self._last_seq + 1,
                    code=Code.STREAM_GAP.value,
                    message=f"tokens {self._last_seq + 1}..{event.seq - 1} were lost on the bus",
                    node_id=self.node_id,
                )
            self._last_seq = event.seq
            self._last_event_at = time.monotonic()
            return event

    async def _failover(self, reason: str, code: str) -> bool:
        """Re-dispatch prompt + text so far to another node; False when we may not or cannot."""
        attempts = len(self.nodes_used) - 1
        if attempts >= self._max_failovers:
            return False
        old = self._attempt_rid
        await self._drop_subscription()
        params = self.request.params
        if params.max_tokens is not None:
            left = params.max_tokens - self._completion_tokens
            if left <= 0:
                return False
            params = msgspec.structs.replace(params, max_tokens=left)
        retry = msgspec.structs.replace(
            self.request,
            request_id=f"{self.request.request_id}-{attempts + 1}",
            continuation=self.request.continuation + self.text,
            params=params,
        )
        log.warning("request %s: %s; continuing on another node", old, reason)
        try:
            # After a gap the node itself is fine: it may take the continuation too.
            exclude = set() if code == Code.STREAM_GAP.value else set(self.nodes_used)
            await self._dispatch(retry, exclude=exclude)
        except BusError as e:
            log.warning("request %s: failover impossible: %s", old, e)
            return False
        return True

    # ------------------------------------------------------------------ ending

    async def _drop_subscription(self) -> None:
        self._client._unregister(self)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _finish(self) -> None:
        self._finished = True
        await self._drop_subscription()

    async def cancel(self) -> None:
        """Ask the node to stop; the stream then ends with Done(finish_reason='cancelled')."""
        if self.node_id and not self._finished:
            await self._client.nc.publish(
                subjects.ctl(self.node_id), encode(Cancel(request_id=self._attempt_rid))
            )

    async def aclose(self) -> None:
        if not self._finished:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.cancel())
            await self._finish()

    @property
    def attempt_request_id(self) -> str:
        return self._attempt_rid


def new_request_id() -> str:
    return uuid.uuid4().hex
