"""Asking a quiet node directly, in one round trip, whether it is gone, hung or just slow.

A killed process's connection closes at once, and NATS answers a request to a subject nobody
listens on with "no responders" at once; a node whose process is stopped (SIGSTOP, a hung host)
keeps its subscriptions but answers nothing; a node busy decoding answers from its event loop, which
the engine's thread does not hold. So a stream that goes quiet for a few hundred milliseconds can
tell the three apart long before the node's heartbeat ages out of the node table.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from bus import subjects
from bus.codec import decode, encode
from bus.errors import BadMessage
from bus.schemas import Probe, ProbeReply

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

__all__ = ["Verdict", "probe"]

_GONE_RECHECK_S = 0.1  # "no responders" twice this far apart: not a node between two cluster members


class Verdict(enum.Enum):
    WORKING = "working"  # the node answered and still has the request: slow, not lost
    FORGOT = "forgot"  # the node answered but has no such request (finished, or it restarted)
    GONE = "gone"  # nobody listens on the node's control subject: its process is gone
    HUNG = "hung"  # the node holds its subscriptions but did not answer in time
    UNKNOWN = "unknown"  # we could not tell (we are disconnected, or the node never answers probes)


async def probe(nc: NATS, node_id: str, request_id: str, timeout: float, *, answers: bool) -> Verdict:
    """What `node_id` says about `request_id`; `answers`: the node's heartbeat says it answers
    probes (an older node's silence means nothing)."""
    if not nc.is_connected:
        return Verdict.UNKNOWN
    reconnects = nc.stats.get("reconnects", 0)
    payload = encode(Probe(request_ids=[request_id]))
    for attempt in range(2):
        try:
            msg = await nc.request(subjects.ctl(node_id), payload, timeout=timeout)
        except NoRespondersError:
            if attempt == 0:  # a node that is reconnecting to another cluster member is back soon
                await asyncio.sleep(_GONE_RECHECK_S)
                continue
            return Verdict.GONE
        except NatsTimeout:
            if not answers or nc.stats.get("reconnects", 0) != reconnects or not nc.is_connected:
                return Verdict.UNKNOWN
            return Verdict.HUNG
        try:
            reply = decode(msg.data, ProbeReply)
        except BadMessage:
            return Verdict.UNKNOWN
        return Verdict.WORKING if request_id in reply.running else Verdict.FORGOT
    return Verdict.UNKNOWN
