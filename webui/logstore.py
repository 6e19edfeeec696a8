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
from collections.abc import Awaitable, Callable

from bus import BATTLE_VOTES, BusClient, ChatLog, VoteLog
from webui.ratings import Battle, battle_from_vote, dedupe_prompts

__all__ = ["LogStore"]

log = logging.getLogger(__name__)


class LogStore:
    """Appends records and keeps every vote in memory (followed live from the stream)."""

    def __init__(self, client: BusClient, *, retry_every_s: float = 1.0) -> None:
        self._client = client
        self._retry_every_s = retry_every_s
        self._pending: deque[tuple[ChatLog | VoteLog, str]] = deque()
        self._votes: list[VoteLog] = []
        self._unfollow: Callable[[], Awaitable[None]] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.version = 0  # bumps on every vote seen in the stream
        self.on_vote: Callable[[VoteLog], None] | None = None

    async def start(self) -> None:
        self._unfollow = await self._client.follow_votes(self._on_vote)
        self._flusher = asyncio.create_task(self._flush_loop(), name="webui-log-flush")

    async def stop(self) -> None:
        if self._flusher:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self._flush_once()
        if self._pending:
            log.error("%d log records could not be stored (is NATS down?)", len(self._pending))
        if self._unfollow:
            await self._unfollow()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def append(self, record: ChatLog | VoteLog) -> bool:
        """Store `record`; False when it is queued for a retry instead (the bus is unreachable)."""
        item = (record, uuid.uuid4().hex)
        if self._pending or not await self._publish(*item):
            self._pending.append(item)
            return False
        return True

    async def _publish(self, record: ChatLog | VoteLog, msg_id: str) -> bool:
        try:
            await self._client.append_log(record, msg_id)
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

    def _on_vote(self, vote: VoteLog) -> None:
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
