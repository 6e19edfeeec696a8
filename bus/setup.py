"""Create every stream and bucket of chatbus at once, with a credential allowed to (admin).

`chatbus up` does this on its own server before it starts anything, so each stream gets our
configuration before any other role could give it one of its own (see bus/auth.py: asking roles may
create their streams but never change one afterwards; nodes may create none, they check).
"""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from bus import subjects
from bus.connection import (
    ensure_logs_stream,
    ensure_nodes_bucket,
    ensure_resume_bucket,
    ensure_tokens_stream,
    ensure_triggers_bucket,
)
from bus.errors import BusUnavailable
from bus.jobs import Jobs
from bus.operations import ensure_operations_buckets
from bus.prompts import ensure_prompts_stream

__all__ = ["node_objects", "prepare_bus"]

log = logging.getLogger(__name__)


async def prepare_bus(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_tokens_stream(js)
    await ensure_prompts_stream(js)
    await ensure_nodes_bucket(js)
    await ensure_resume_bucket(js)
    await ensure_logs_stream(js)
    await ensure_triggers_bucket(js)
    await Jobs(nc).start()
    await ensure_operations_buckets(js)


async def node_objects(js: JetStreamContext) -> KeyValue:
    """What a node writes to, checked, not created: the token stream and the node table (the node
    table opened). On a server without credentials (tests, `chatbus up --no-auth`) a missing one is
    created; a node credential may not, and is told to run the admin setup."""
    try:
        await js.find_stream_name_by_subject(subjects.tokens_all())
        return await js.key_value(subjects.NODES_BUCKET)
    except NotFoundError:
        pass
    try:
        await ensure_tokens_stream(js)
        return await ensure_nodes_bucket(js)
    except Exception as e:
        log.debug("cannot create the token stream or node table: %r", e)
        raise BusUnavailable(
            f"the bus has no {subjects.TOKENS_STREAM} stream or {subjects.NODES_BUCKET} bucket, and a node "
            f"may not create them: run `chatbus setup-bus --nats nats://admin:PASSWORD@HOST:PORT` once"
        ) from e
