"""The durable chat & vote log (JetStream stream CB_LOGS): append, follow the votes, read it all.

Appends carry a message id, so a retry after a lost ack is stored once. When the bus is down an
append waits in memory and is retried until it is stored, so a user's vote is not lost to a blip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from bus import subjects
from bus.codec import decode, encode
from bus.connection import ensure_logs_stream
from bus.errors import BadMessage
from bus.schemas_logs import BATTLE_VOTES, ChatLog, LogRecord, VoteLog
from webui.ratings import Battle, battle_from_vote, dedupe_prompts

__all__ = ["LogStore", "read_log"]

log = logging.getLogger(__name__)


async def read_log(js: JetStreamContext, subject: str | None = None) -> AsyncIterator[LogRecord]:
    """Every record stored so far (oldest first), then stop."""
    try:
        info = await js.stream_info(subjects.LOGS_STREAM)
    except NotFoundError:
        return
    if not info.state.messages:
        return
    sub = await js.subscribe(
        subject or subjects.logs_all(),
        stream=subjects.LOGS_STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2.0)
            except Exception:  # nothing more on this subject
                return
            try:
                yield decode(msg.data, LogRecord)
            except BadMessage as e:
                log.warning("skipping an unreadable log record: %s", e)
            if msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


class LogStore:
    """Appends records and keeps every vote in memory (followed live from the stream)."""

    def __init__(self, js: JetStreamContext, *, retry_every_s: float = 1.0) -> None:
        self._js = js
        self._retry_every_s = retry_every_s
        self._pending: deque[tuple[str, bytes, str]] = deque()
        self._votes: list[VoteLog] = []
        self._sub: JetStreamContext.PushSubscription | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.version = 0  # bumps on every vote seen in the stream
        self.on_vote: Callable[[VoteLog], None] | None = None

    async def start(self) -> None:
        await ensure_logs_stream(self._js)
        self._sub = await self._js.subscribe(
            subjects.log_vote(),
            stream=subjects.LOGS_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            cb=self._on_vote_msg,
        )
        self._flusher = asyncio.create_task(self._flush_loop(), name="webui-log-flush")

    async def stop(self) -> None:
        if self._flusher:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush_once()
        if self._pending:
            log.error("%d log records could not be stored (is NATS down?)", len(self._pending))
        if self._sub:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def append(self, record: ChatLog | VoteLog) -> bool:
        """Store `record`; False when it is queued for a retry instead (the bus is unreachable)."""
        subject = subjects.log_vote() if isinstance(record, VoteLog) else subjects.log_chat()
        item = (subject, encode(record), uuid.uuid4().hex)
        if self._pending or not await self._publish(*item):
            self._pending.append(item)
            return False
        return True

    async def _publish(self, subject: str, data: bytes, msg_id: str) -> bool:
        try:
            await self._js.publish(
                subject, data, stream=subjects.LOGS_STREAM, timeout=2.0, headers={"Nats-Msg-Id": msg_id}
            )
            return True
        except Exception as e:
            log.warning("log append failed, will retry: %r", e)
            return False

    async def _flush_once(self) -> None:
        while self._pending and await self._publish(*self._pending[0]):
            self._pending.popleft()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._retry_every_s)
            await self._flush_once()

    async def _on_vote_msg(self, msg: Msg) -> None:
        try:
            vote = decode(msg.data, VoteLog)
        except BadMessage as e:
            log.warning("skipping an unreadable vote: %s", e)
            return
        self._votes.append(vote)
        self.version += 1
        if self.on_vote:
            self.on_vote(vote)

    # ------------------------------------------------------------------ queries

    def votes(self) -> list[VoteLog]:
        return list(self._votes)

    def battles(self, *, include_named: bool = False) -> list[Battle]:
        """Rated battles: anonymous arena votes (and named side-by-side ones if asked), no leaks."""
        return battles_from_votes(self._votes, include_named=include_named)


DEDUPE_KEEP = 3  # rated battles per prompt (the same "hi" a hundred times counts three times)


def battles_from_votes(votes: list[VoteLog], *, include_named: bool = False) -> list[Battle]:
    out = []
    for v in votes:
        if v.kind not in BATTLE_VOTES or len(v.models) != 2 or v.leaked_identity:
            continue
        if v.models[0] == v.models[1]:  # a model against itself says nothing about its rating
            continue
        if v.mode == "arena" or (include_named and v.mode == "side_by_side"):
            lengths = [sum(len(m.content) for m in s.messages if m.role == "assistant") for s in v.states]
            prompt = (
                next((m.content for m in v.states[0].messages if m.role == "user"), "") if v.states else ""
            )
            len_a, len_b = lengths if len(lengths) == 2 else (0, 0)
            out.append(
                battle_from_vote(v.kind, v.models[0], v.models[1], len_a=len_a, len_b=len_b, prompt=prompt)
            )
    return dedupe_prompts(out, keep=DEDUPE_KEEP)
