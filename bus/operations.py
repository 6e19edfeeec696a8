"""The buckets operators' features live in (node metrics, API keys, limit counters, usage) and watching them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue

from bus import subjects
from bus.codec import decode
from bus.connection import NODE_TTL_S, ensure_bucket
from bus.errors import BadMessage
from bus.schemas_metrics import NodeMetrics

__all__ = [
    "LIMITS_TTL_S",
    "METRICS_S",
    "KVMirror",
    "MetricsView",
    "ensure_keys_bucket",
    "ensure_limits_bucket",
    "ensure_metrics_bucket",
    "ensure_operations_buckets",
    "ensure_usage_bucket",
    "follow",
    "open_metrics_bucket",
]

log = logging.getLogger(__name__)

METRICS_S = 1.0  # how often a node re-puts its metrics snapshot
LIMITS_TTL_S = 180.0  # a minute window outlives its minute; a dead gateway's open streams expire


async def ensure_metrics_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(
        js,
        KeyValueConfig(bucket=subjects.METRICS_BUCKET, ttl=NODE_TTL_S, storage=StorageType.MEMORY, history=1),
    )


async def open_metrics_bucket(js: JetStreamContext) -> KeyValue:
    """The metrics bucket as a node opens it: made by the admin setup (a node credential may not create
    it); created here only on a server without credentials (tests, `--no-auth`)."""
    try:
        return await js.key_value(subjects.METRICS_BUCKET)
    except BucketNotFoundError:
        return await ensure_metrics_bucket(js)


async def ensure_keys_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(
        js, KeyValueConfig(bucket=subjects.KEYS_BUCKET, storage=StorageType.FILE, history=1)
    )


async def ensure_limits_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(
        js,
        KeyValueConfig(bucket=subjects.LIMITS_BUCKET, ttl=LIMITS_TTL_S, storage=StorageType.FILE, history=1),
    )


async def ensure_usage_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(
        js, KeyValueConfig(bucket=subjects.USAGE_BUCKET, storage=StorageType.FILE, history=1)
    )


async def ensure_operations_buckets(js: JetStreamContext) -> None:
    await ensure_metrics_bucket(js)
    await ensure_keys_bucket(js)
    await ensure_limits_bucket(js)
    await ensure_usage_bucket(js)


Reconnects = Callable[[], int]


async def follow(
    kv: KeyValue,
    keys: str,
    apply: Callable[[str, bytes | None], None],
    synced: asyncio.Event,
    reconnects: Reconnects | None = None,
    silence_s: float | None = None,
) -> None:
    """Follow `keys` in `kv` forever: apply(key, value or None) for each change. The watch starts
    over (replaying the current values) on errors, after the connection was re-established (the
    server may have forgotten our consumer: a revoked key must not go unseen) and, with `silence_s`,
    when nothing came for that long."""
    while True:
        watcher = None
        count = reconnects() if reconnects else 0
        try:
            watcher = await kv.watch(keys)
            quiet = 0.0
            while reconnects is None or reconnects() == count:
                try:
                    entry = await watcher.updates(timeout=1.0)
                except NatsTimeout:
                    quiet += 1.0
                    if silence_s is not None and quiet >= silence_s:
                        break
                    continue
                quiet = 0.0
                if entry is None:
                    synced.set()
                    continue
                apply(entry.key, entry.value if entry.operation is None else None)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("watch of %s stopped (%r); watching again", keys, e)
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        await asyncio.sleep(0.5)


class KVMirror:
    """A local copy of a whole KV bucket, kept by `follow`; a subclass says what each change does."""

    silence_s: float | None = None  # restart a watch this quiet (None: never)

    def __init__(self, kv: KeyValue, reconnects: Reconnects | None = None) -> None:
        self._kv = kv
        self._reconnects = reconnects
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 5.0) -> None:
        """Follow the bucket; return once what it holds now has been applied."""
        watch = follow(self._kv, ">", self._apply, self._synced, self._reconnects, silence_s=self.silence_s)
        self._task = asyncio.create_task(watch)
        await asyncio.wait_for(self._synced.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _apply(self, key: str, value: bytes | None) -> None:
        raise NotImplementedError


class MetricsView(KVMirror):
    """The latest snapshot of every node, from a watch on `cb_metrics` (stale ones dropped)."""

    silence_s = 3 * METRICS_S  # nodes put a snapshot every METRICS_S: restart well within the node TTL

    def __init__(self, kv: KeyValue, reconnects: Reconnects | None = None) -> None:
        super().__init__(kv, reconnects)
        self._seen: dict[str, tuple[NodeMetrics, float]] = {}

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._seen.pop(key, None)
            return
        with contextlib.suppress(BadMessage):
            self._seen[key] = (decode(value, NodeMetrics), time.monotonic())

    def nodes(self) -> list[NodeMetrics]:
        now = time.monotonic()  # KV expiry sends watchers nothing: drop what stopped coming
        return [m for m, at in self._seen.values() if now - at < NODE_TTL_S]
