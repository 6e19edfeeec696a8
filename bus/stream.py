"""One generation as the caller sees it: dispatch, token stream, cancel, failover, resume.

The caller gets one continuous stream of `Chunk` events ending in exactly one `Done` or `Failed`,
even when the node that started the answer dies: the text so far is re-dispatched to another node
as a `continuation` (bounded attempts) and the new node's chunks are renumbered to follow on.

Every dispatch is an `Attempt` with its own token stream in CB_TOKENS. The list of attempts (with
how many events of each the caller consumed) is all it takes to rebuild the caller's view from the
token record later, in any process: `BusClient.resume` replays it up to a sequence number and then
follows on, continuing the answer on a node if it was cut short (cancelled because its client went
away, or its node died meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from bus import prompts, subjects
from bus.codec import decode, encode
from bus.connection import TOKENS_MAX_AGE_S
from bus.dispatch import StreamHost, dispatch
from bus.errors import (
    BadMessage,
    BadRequest,
    BusError,
    BusUnavailable,
    Code,
)
from bus.probe import Verdict, probe
from bus.schemas import (
    Accepted,
    Cancel,
    Chunk,
    Done,
    Failed,
    GenerateRequest,
    KeepAlive,
    PromptRef,
    StreamEvent,
    Usage,
)

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

__all__ = ["Attempt", "ChatStream", "new_request_id"]

log = logging.getLogger(__name__)

# Failures after which the answer may continue on another node.
_FAILOVER_CODES = {Code.NODE_LOST.value, Code.SHUTTING_DOWN.value, Code.STREAM_GAP.value}
# After these the node itself is fine and may take the continuation too.
_SAME_NODE_OK = {Code.STREAM_GAP.value, Code.CANCELLED.value}
_REPLAY_WAIT_S = 3.0  # recorded events arrive at once; silence this long means the record expired
# Silent this long with the node alive: re-subscribe, in case our consumer died or stalled when a
# cluster member went down (the new one is made by the stream's current leader).
_RESUBSCRIBE_S = 3.0
_SUBSCRIBE_RETRY_S = 10.0  # a cluster elects a new leader for the token stream in a few seconds
# A node whose heartbeats do not arrive but that is not known gone (it answers probes while its KV
# puts fail during a leader election, or it is reconnecting to another member) is lost only after
# this long a silence.
_UNHEARD_S = 15.0


class Attempt(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One dispatch of an answer: its token stream, its node, and how many of its events the caller
    consumed before the answer moved on to the next attempt (0 for the current one)."""

    request_id: str
    node_id: str = ""
    last_seq: int = 0


class ChatStream(AsyncIterator[StreamEvent]):
    """`await start()` raises typed errors before any event (handy for HTTP status codes);
    iterating starts it implicitly. `aclose()` cancels an unfinished generation on the node."""

    def __init__(self, client: StreamHost, request: GenerateRequest, max_failovers: int) -> None:
        self._client = client
        self.request = request
        self.request_id = request.request_id
        self.node_id = ""
        self.prompt_tokens = 0
        self.nodes_used: list[str] = []
        self.result: Done | Failed | None = None  # the last event, once there is one
        self._max_failovers = max_failovers
        self._failovers = 0
        self._sub: JetStreamContext.PushSubscription | None = None
        self._started = False
        self._finished = False
        self._attempt_rid = request.request_id
        self._past: list[Attempt] = []  # attempts the answer moved on from
        self._inherited: set[str] = set()  # attempts dispatched before this object (resume)
        self._cancelled: set[str] = set()  # attempts this object asked to cancel
        self._resume: tuple[list[Attempt], int] | None = None
        self._last_seq = 0  # within the current attempt
        self._out_seq = 0  # as the caller sees it
        self._text: list[str] = []
        self._completion_tokens = 0
        self._last_event_at = 0.0
        self._reconnects = 0
        self._subscribed_at = 0.0
        self._forgot = False  # the node said it no longer has the request, once since the last event
        self.probes = 0  # how often the node was asked whether it is still there
        self._prompt_ref: PromptRef | None = None  # where a prompt too large for a message waits

    @classmethod
    def resuming(
        cls,
        client: StreamHost,
        request: GenerateRequest,
        max_failovers: int,
        attempts: list[Attempt],
        after: int,
        prompt_tokens: int = 0,
    ) -> ChatStream:
        """The stream of an answer already under way: `start()` replays its record up to event
        `after`, iteration yields what follows (recorded first, then live)."""
        stream = cls(client, request, max_failovers)
        stream.prompt_tokens = prompt_tokens
        stream._resume = (list(attempts), after)
        stream._inherited = {a.request_id for a in attempts}
        return stream

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def attempts(self) -> list[Attempt]:
        """Every dispatch of this answer so far, in order; enough to resume it anywhere."""
        if not self.node_id:
            return list(self._past)
        return [*self._past, Attempt(request_id=self._attempt_rid, node_id=self.node_id)]

    @property
    def attempt_request_id(self) -> str:
        return self._attempt_rid

    # ------------------------------------------------------------------ dispatch

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        try:
            if self._resume is None:
                await self._dispatch(self.request, exclude=set())
            else:
                await self._replay(*self._resume)
        except BaseException:
            await self._finish()
            raise

    async def _dispatch(self, request: GenerateRequest, exclude: set[str], *, failover: bool = False) -> None:
        """Find a node that accepts `request` (bus/dispatch.py) and follow its token stream."""
        if not prompts.fits(request, self._client.max_payload):
            request = await self._by_reference(request)
        sent, accepted = await dispatch(
            self._client,
            request,
            exclude,
            failover=failover,
            stream_id=self.request.request_id,
            abandoned=self._cancelled,
        )
        await self._accepted(sent, accepted)

    async def _by_reference(self, request: GenerateRequest) -> GenerateRequest:
        """`request` with its prompt in the prompts stream (stored once per answer: a failover or a
        resume sends the same reference), and so the answer's own request from now on."""
        if request.prompt_ref is not None:
            return request
        if self._prompt_ref is None:
            self._prompt_ref = await prompts.store(self._client.js, request, self._client.max_payload)
            if self.request.prompt_ref is None:
                self.request = prompts.by_reference(self.request, self._prompt_ref)
        return prompts.by_reference(request, self._prompt_ref)

    async def _accepted(self, request: GenerateRequest, reply: Accepted) -> None:
        self.node_id = reply.node_id
        self.nodes_used.append(reply.node_id)
        if not self.prompt_tokens:
            self.prompt_tokens = reply.prompt_tokens
        await self._follow(request.request_id)

    async def _follow(self, attempt_rid: str) -> None:
        """Make `attempt_rid` (on `self.node_id`) the current attempt, from its first event."""
        self._attempt_rid = attempt_rid
        self._last_seq = 0
        self._forgot = False
        self._last_event_at = time.monotonic()
        await self._subscribe()
        self._client.track(self)

    async def _subscribe(self) -> None:
        """(Re)subscribe to this attempt's token stream from its start; seen events are skipped."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._reconnects = self._client.reconnects()
        self._subscribed_at = time.monotonic()
        deadline = time.monotonic() + _SUBSCRIBE_RETRY_S
        while True:
            try:
                self._sub = await self._consumer()
                return
            except (NatsTimeout, NoRespondersError, NoStreamResponseError, ServiceUnavailableError) as e:
                # The token stream has no leader for a few seconds after its server dies.
                if time.monotonic() > deadline:
                    raise BusUnavailable(f"cannot follow the answer on the bus right now ({e!r})") from e
                await asyncio.sleep(0.25)

    async def _consumer(self) -> JetStreamContext.PushSubscription:
        return await self._client.js.subscribe(
            subjects.token(self.request.owner, self._attempt_rid),
            stream=subjects.TOKENS_STREAM,
            # A named consumer: its create request carries the filter in its subject, which is how
            # the server checks that we read only our own user's token streams (bus/auth.py).
            config=ConsumerConfig(name=f"tok-{secrets.token_hex(8)}"),
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            # nats-py re-creates the consumer after two missed beats: 2 s, not 10, when it died with
            # its server (in a cluster), well before the node looks lost.
            idle_heartbeat=1.0,
        )

    # ------------------------------------------------------------------ resume

    async def _replay(self, attempts: list[Attempt], after: int) -> None:
        """Rebuild text, token count and sequence from the record, up to event `after`."""
        if not attempts:
            raise BadRequest("nothing to resume: the record names no attempt")
        *past, last = attempts
        for attempt in past:
            self.node_id = attempt.node_id
            self.nodes_used.append(attempt.node_id)
            self._attempt_rid, self._last_seq = attempt.request_id, 0
            if attempt.last_seq:
                await self._subscribe()
                while self._last_seq < attempt.last_seq:
                    event = await self._recorded_event()
                    if isinstance(event, Chunk):
                        self._take(event)
            self._past.append(attempt)
        self.node_id = last.node_id
        self.nodes_used.append(last.node_id)
        await self._follow(last.request_id)
        with contextlib.suppress(Exception):  # still generating? then it has a listener again, now
            await self._client.nc.publish(
                subjects.ctl(last.node_id), encode(KeepAlive(request_ids=[last.request_id]))
            )
        while self._out_seq < after:
            if await self._advance() is None:
                raise BadRequest(
                    f"cannot resume after event {after}: the record of {self.request_id} ends at event "
                    f"{self._out_seq}"
                )

    async def _recorded_event(self) -> StreamEvent:
        """The next stored event of a past attempt (they are all in the stream already)."""
        assert self._sub is not None
        while True:
            try:
                msg = await self._sub.next_msg(timeout=_REPLAY_WAIT_S)
            except NatsTimeout:
                raise BadRequest(
                    f"the token record of {self._attempt_rid} is gone (token streams are kept "
                    f"{TOKENS_MAX_AGE_S / 60:.0f} minutes); send the request again"
                ) from None
            event: StreamEvent = decode(msg.data, StreamEvent)
            if event.seq > self._last_seq:
                self._last_seq = event.seq
                return event

    def _cut_short(self, event: StreamEvent) -> bool:
        """A recorded answer stopped by a cancel nobody here asked for: its client went away
        (cancel on disconnect) or its gateway died (no keep-alive). A resume continues it."""
        if self._attempt_rid not in self._inherited or self._attempt_rid in self._cancelled:
            return False
        if isinstance(event, Done):
            return event.finish_reason == "cancelled"
        return isinstance(event, Failed) and event.code == Code.CANCELLED.value

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> ChatStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if not self._started:
            await self.start()
        event = await self._advance()
        if event is None:
            raise StopAsyncIteration
        return event

    async def _advance(self) -> StreamEvent | None:
        """The next event as the caller sees it (renumbered), following failovers; None at the end."""
        while not self._finished:
            event = await self._next_event()
            if isinstance(event, Chunk):
                return self._take(event)
            if self._cut_short(event) and await self._failover(
                "the answer was cut short", Code.CANCELLED.value
            ):
                continue
            if isinstance(event, Failed) and event.code in _FAILOVER_CODES:
                if await self._failover(event.message, event.code):
                    continue
            await self._finish()
            self._out_seq += 1
            if isinstance(event, Done):
                usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self._completion_tokens)
                self.result = msgspec.structs.replace(event, seq=self._out_seq, usage=usage)
            else:
                self.result = msgspec.structs.replace(event, seq=self._out_seq)
            return self.result
        return None

    def _take(self, chunk: Chunk) -> Chunk:
        self._text.append(chunk.text)
        self._completion_tokens += chunk.tokens
        self._out_seq += 1
        return msgspec.structs.replace(chunk, seq=self._out_seq)

    async def _next_event(self) -> StreamEvent:
        """The next event of this attempt; a silent, vanished node becomes Failed(node_lost)."""
        while True:
            assert self._sub is not None
            try:
                msg = await self._sub.next_msg(timeout=self._client.stall_check_s)
            except NatsTimeout:
                lost = await self._quiet()
                if lost is None:
                    continue
                await self.cancel()  # a hung node that wakes up must not go on for nobody
                return Failed(
                    seq=self._last_seq + 1, code=Code.NODE_LOST.value, message=lost, node_id=self.node_id
                )
            try:
                event: StreamEvent = decode(msg.data, StreamEvent)
            except BadMessage as e:
                await self.cancel()
                return Failed(
                    seq=self._last_seq + 1,
                    code=Code.INTERNAL.value,
                    message=f"node {self.node_id} sent an unreadable token event (another chatbus version?): {e}",
                    node_id=self.node_id,
                )
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
            self._forgot = False
            return event

    async def _quiet(self) -> str | None:
        """The stream has been quiet for `stall_check_s`: why the node is lost, or None to wait on.

        The node is asked directly (bus/probe.py): gone or hung ends the attempt within a round
        trip; a node that is merely slow says it is still working. Our consumer may have died with
        its server or a reconnect: quiet for _RESUBSCRIBE_S, or a node that no longer has the
        request, re-subscribes (the record holds whatever we missed) before anything is concluded.
        """
        client = self._client
        quiet = time.monotonic() - max(self._last_event_at, self._subscribed_at)
        if client.reconnects() != self._reconnects:
            with contextlib.suppress(Exception):  # the server restarted: resume from the record
                await self._subscribe()
            return None
        answers = any(n.node_id == self.node_id and n.answers_probes for n in client.table.nodes())
        self.probes += 1
        verdict = await probe(
            client.nc, self.node_id, self._attempt_rid, client.probe_timeout_s, answers=answers
        )
        silent = time.monotonic() - self._last_event_at
        if verdict is Verdict.GONE:
            return f"node {self.node_id} is gone (its process left the bus; {silent:.1f}s without tokens)"
        if verdict is Verdict.HUNG:
            return f"node {self.node_id} does not answer ({silent:.1f}s without tokens)"
        # Unheard but not known gone (it may be reconnecting to another cluster member, its
        # heartbeats failing while the token stream elects a leader): lost only after _UNHEARD_S.
        if not client.table.is_alive(self.node_id) and silent > _UNHEARD_S:
            return f"node {self.node_id} stopped heartbeating ({silent:.1f}s without tokens)"
        if verdict is Verdict.FORGOT and not self._forgot:
            self._forgot = True  # maybe it finished and our consumer missed the end: read the record
        elif verdict is Verdict.FORGOT and quiet > _RESUBSCRIBE_S:
            return f"node {self.node_id} no longer has request {self._attempt_rid} (did it restart?)"
        elif quiet <= _RESUBSCRIBE_S:
            return None
        with contextlib.suppress(Exception):
            await self._subscribe()
        return None

    async def _failover(self, reason: str, code: str) -> bool:
        """Re-dispatch prompt + text so far to a node; False when we may not or cannot.

        A continuation after a cut-short record is not a failure and does not count as one.
        """
        if code != Code.CANCELLED.value:
            if self._failovers >= self._max_failovers:
                return False
            self._failovers += 1
        old = Attempt(request_id=self._attempt_rid, node_id=self.node_id, last_seq=self._last_seq)
        await self._drop_subscription()
        params = self.request.params
        if params.max_tokens is not None:
            left = params.max_tokens - self._completion_tokens
            if left <= 0:
                return False
            params = msgspec.structs.replace(params, max_tokens=left)
        # A fresh id per attempt: two gateways resuming one answer never share a token stream.
        base = self.request.request_id[: subjects.MAX_NAME_BYTES // 2]  # the attempt id stays a valid name
        attempt_rid = f"{base}-{len(self._past) + 1}-{secrets.token_hex(2)}"
        retry = msgspec.structs.replace(
            self.request,
            request_id=attempt_rid,
            continuation=self.request.continuation + self.text,
            params=params,
            keepalive_s=self._client.keepalive_s,  # ours: the request may come from another client
        )
        log.warning("request %s: %s; continuing as %s", old.request_id, reason, attempt_rid)
        try:
            # A lost node has left the node table already; this keeps a draining one out too.
            exclude = set() if code in _SAME_NODE_OK else {old.node_id}
            await self._dispatch(retry, exclude=exclude, failover=True)
        except BusError as e:
            log.warning("request %s: cannot continue it: %s", old.request_id, e)
            return False
        self._past.append(old)
        return True

    # ------------------------------------------------------------------ ending

    async def _drop_subscription(self) -> None:
        self._client.untrack(self)
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
            self._cancelled.add(self._attempt_rid)
            with contextlib.suppress(Exception):  # best effort: a lost client is also noticed by keep-alive
                await self._client.nc.publish(
                    subjects.ctl(self.node_id), encode(Cancel(request_id=self._attempt_rid))
                )

    async def aclose(self) -> None:
        if not self._finished:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.cancel())
            await self._finish()


def new_request_id() -> str:
    return uuid.uuid4().hex
