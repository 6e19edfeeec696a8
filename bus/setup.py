"""Create every stream and bucket of chatbus at once, with a credential allowed to (admin).

`chatbus up` does this on its own server before it starts anything, so each stream gets our
configuration before any other role could give it one of its own (see bus/auth.py: asking roles may
create their streams but never change one afterwards).
"""

from __future__ import annotations

from nats.aio.client import Client as NATS

from bus.connection import (
    ensure_logs_stream,
    ensure_nodes_bucket,
    ensure_resume_bucket,
    ensure_tokens_stream,
    ensure_triggers_bucket,
)
from bus.jobs import Jobs
from bus.operations import ensure_operations_buckets

__all__ = ["prepare_bus"]


async def prepare_bus(nc: NATS) -> None:
    js = nc.jetstream()
    await ensure_tokens_stream(js)
    await ensure_nodes_bucket(js)
    await ensure_resume_bucket(js)
    await ensure_logs_stream(js)
    await ensure_triggers_bucket(js)
    await Jobs(nc).start()
    await ensure_operations_buckets(js)
