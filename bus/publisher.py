"""Publish a record to JetStream without waiting for each ack, and still get every message stored.

A token stream is the record of an answer: a message the server did not store (the stream had no
leader for a moment while the cluster elected one, or the connection died with it in flight) is
published again, oldest first, under its message id, so a copy that was stored after all is
dropped by the stream's duplicate window. A message still not stored after `give_up_s` is dropped
and logged; the reader then sees a gap and fails over.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext

__all__ = ["RecordPublisher"]

log = logging.getLogger(__name__)


@dataclass
class _Message:
    order: int
    subject: str
    data: bytes
    msg_id: str
    first_sent: float = field(default_factory=time.monotonic)
    sent_at: float = 0.0
    ack: asyncio.Future[Any] | None = None


class RecordPublisher:
    """`publish()` returns once the message is handed to the connection; storing is checked later."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
        ack_timeout_s: float = 3.0,
        give_up_s: float = 60.0,
        tick_s: float = 0.25,
    ) -> None:
        self.js = js
        self.on_failure = on_failure  # e.g. re-create the stream, in case the server lost it
        self.ack_timeout_s = ack_timeout_s
        self.give_up_s = give_up_s
        self.tick_s = tick_s
        self._order = itertools.count()
        self._inflight: dict[int, _Message] = {}
        self._retry: list[_Message] = []  # kept sorted by `order`
        self._task: asyncio.Task[None] | None = None
        self.republished = 0

    @property
    def pending(self) -> int:
        """Messages not known to be stored yet."""
        return len(self._inflight) + len(self._retry)

    def holds(self, msg_id_prefix: str) -> bool:
        """Whether a message whose id starts so is not known to be stored yet (its record is still
        being written: a reader waiting on it should wait, not conclude the writer forgot it)."""
        return any(m.msg_id.startswith(msg_id_prefix) for m in (*self._inflight.values(), *self._retry))

    async def publish(self, subject: str, data: bytes, msg_id: str) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._check_loop(), name="record-publisher")
        message = _Message(next(self._order), subject, data, msg_id)
        if self._retry:  # keep the order: behind the messages waiting to go again
            self._again(message, None)
            return
        try:
            ack = await self.js.publish_async(subject, data, wait_stall=5.0, headers={"Nats-Msg-Id": msg_id})
        except Exception as e:
            self._again(message, e)
            return
        message.ack, message.sent_at = ack, time.monotonic()
        self._inflight[message.order] = message
        ack.add_done_callback(lambda f: self._acked(message, f))

    async def flush(self, timeout: float) -> bool:
        """Wait until every message is stored (or given up); False if `timeout` ran out first."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.pending

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for message in self._inflight.values():
            if message.ack is not None:
                message.ack.cancel()
        self._inflight.clear()

    def _acked(self, message: _Message, ack: asyncio.Future[Any]) -> None:
        if self._inflight.pop(message.order, None) is None or ack.cancelled():
            return  # already timed out and queued again
        if ack.exception() is not None:
            self._again(message, ack.exception())

    def _again(self, message: _Message, error: BaseException | None) -> None:
        if error is not None:
            if not self._retry:
                log.warning("publish to %s failed (%r); publishing it again", message.subject, error)
            if self.on_failure is not None:
                self.on_failure(error)
        bisect.insort(self._retry, message, key=lambda m: m.order)

    async def _check_loop(self) -> None:
        while True:
            now = time.monotonic()
            for message in [m for m in self._inflight.values() if now - m.sent_at > self.ack_timeout_s]:
                del self._inflight[message.order]  # no ack: the connection died with it in flight
                if message.ack is not None:
                    message.ack.cancel()
                self._again(message, TimeoutError(f"no ack in {self.ack_timeout_s:.0f}s"))
            if not self._retry:
                await asyncio.sleep(self.tick_s)
                continue
            message = self._retry[0]
            if now - message.first_sent > self.give_up_s:
                log.error("dropping a message for %s: not stored in %.0fs", message.subject, self.give_up_s)
                self._retry.pop(0)
                continue
            try:
                await self.js.publish(
                    message.subject, message.data, timeout=2.0, headers={"Nats-Msg-Id": message.msg_id}
                )
            except Exception as e:
                log.debug("publishing %s again failed (%r)", message.subject, e)
                await asyncio.sleep(self.tick_s)
                continue
            self._retry.pop(0)
            self.republished += 1
