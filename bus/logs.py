"""The chat and vote log (stream CB_LOGS): read it back, append to it, follow new votes.

BusClient offers these as `read_logs`, `append_log` and `follow_votes`; the web app and
`chatbus export-logs` are their users.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from bus import subjects
from bus.codec import decode, encode
from bus.connection import ensure_logs_stream
from bus.errors import BadMessage
from bus.schemas_logs import ChatLog, LogRecord, VoteLog

__all__ = ["append_log", "follow_votes", "read_logs"]

log = logging.getLogger(__name__)


async def read_logs(js: JetStreamContext, subject: str | None = None) -> AsyncIterator[LogRecord]:
    """Every record stored so far (oldest first), then stop; unreadable records are skipped."""
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


async def append_log(js: JetStreamContext, record: ChatLog | VoteLog, msg_id: str) -> None:
    """Store `record` once (`msg_id` makes a retried append a no-op); raises when the bus does not take it."""
    subject = subjects.log_vote() if isinstance(record, VoteLog) else subjects.log_chat()
    await js.publish(
        subject, encode(record), stream=subjects.LOGS_STREAM, timeout=2.0, headers={"Nats-Msg-Id": msg_id}
    )


async def follow_votes(
    js: JetStreamContext, on_vote: Callable[[VoteLog], Awaitable[None] | None]
) -> Callable[[], Awaitable[None]]:
    """Call `on_vote` for every vote, stored and new (the log stream is made if missing); returns `stop`."""
    await ensure_logs_stream(js)

    async def deliver(msg: Msg) -> None:
        try:
            vote = decode(msg.data, VoteLog)
        except BadMessage as e:
            log.warning("skipping an unreadable vote: %s", e)
            return
        result = on_vote(vote)
        if result is not None:
            await result

    sub = await js.subscribe(
        subjects.log_vote(),
        stream=subjects.LOGS_STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        cb=deliver,
    )

    async def stop() -> None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    return stop
