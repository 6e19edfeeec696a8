"""Connecting to NATS with sane settings, and creating the streams and buckets idempotently."""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from bus import subjects
from bus.errors import BusUnavailable

__all__ = [
    "HEARTBEAT_S",
    "NODE_TTL_S",
    "connect",
    "ensure_bucket",
    "ensure_nodes_bucket",
    "ensure_stream",
    "ensure_tokens_stream",
]

log = logging.getLogger(__name__)

NODE_TTL_S = 6.0  # a node that stops heartbeating is gone from `models()` after this long
HEARTBEAT_S = 2.0
TOKENS_MAX_AGE_S = 600.0  # token streams are replayable (resume) for this long


async def connect(url: str, *, name: str, timeout: float = 5.0) -> NATS:
    """Connect, or raise BusUnavailable with a message that says what to do.

    `url` may list several servers of a cluster, comma-separated. Pings every 5 s (the default 120 s
    hides a dead server for minutes) and reconnects forever, to any server of the cluster.
    """

    async def on_error(e: Exception) -> None:
        log.debug("nats: %s", e)

    async def on_disconnect() -> None:
        log.info("nats: disconnected from %s", url)

    async def on_reconnect() -> None:
        log.warning("nats: reconnected to %s", url)

    try:
        return await asyncio.wait_for(
            nats.connect(
                [u.strip() for u in url.split(",") if u.strip()],  # a cluster: several seed URLs
                name=name,
                connect_timeout=min(timeout, 2.0),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                ping_interval=5,
                max_outstanding_pings=2,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            ),
            timeout,
        )
    except (TimeoutError, OSError, nats.errors.NoServersError) as e:
        raise BusUnavailable(
            f"cannot reach NATS at {url} ({type(e).__name__}); start one with `chatbus up` "
            f"or pass --nats nats://HOST:PORT of a running server"
        ) from e


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, disposable: bool = False) -> None:
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Exists with another config (an older version of ours): bring it to this one.
        try:
            await js.update_stream(config)
        except BadRequestError:
            if not disposable:
                raise
            # e.g. the storage type changed, which the server cannot update: the data is
            # short-lived (token streams), so start the stream afresh.
            await js.delete_stream(config.name or "")
            await js.add_stream(config)


async def ensure_tokens_stream(js: JetStreamContext) -> None:
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.TOKENS_STREAM,
            subjects=[subjects.tokens_all()],
            # File, not memory: the token stream is the record, and survives a server restart.
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            max_age=TOKENS_MAX_AGE_S,
            max_bytes=256 * 1024 * 1024,
        ),
        disposable=True,
    )


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The KV bucket `config.bucket`, created with `config` if it does not exist yet."""
    try:
        return await js.key_value(config.bucket or "")
    except Exception:
        return await js.create_key_value(config)


async def ensure_nodes_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(
        js, KeyValueConfig(bucket=subjects.NODES_BUCKET, ttl=NODE_TTL_S, storage=StorageType.FILE, history=1)
    )
