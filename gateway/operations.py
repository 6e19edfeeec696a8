"""What the gateway keeps for operators: metrics, managed keys and their limits, started on first use."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request

from bus import (
    BusClient,
    BusUnavailable,
    ChatStream,
    MetricsView,
    ensure_keys_bucket,
    ensure_limits_bucket,
    ensure_metrics_bucket,
    ensure_usage_bucket,
)
from gateway.errors import ApiError
from gateway.keys import KeyStore, Lease, Limiter
from gateway.metrics import BusCollector, GatewayMetrics

__all__ = ["GatewayOps", "admit", "count_failovers", "tracked"]

log = logging.getLogger(__name__)

_RETRY_S = 5.0  # after a failed start (no bus yet), try again on a request this much later


class GatewayOps:
    """Metrics, the key table and the limiter of one gateway app. Their watches start on the first
    request that needs them (or `start()`), so `build_app` stays synchronous; `stop()` ends them."""

    def __init__(self, client: BusClient) -> None:
        self.client = client
        self.gateway_id = f"{socket.gethostname()[:24]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.metrics = GatewayMetrics()
        self.keys: KeyStore | None = None
        self.limiter: Limiter | None = None
        self.view: MetricsView | None = None
        self._lock = asyncio.Lock()
        self._failed_at = 0.0

    async def ready(self) -> bool:
        """Started (now, if not yet); False while the bus will not let us (logged, retried later)."""
        if self.limiter is not None:
            return True
        if not self.client.connected or time.monotonic() - self._failed_at < _RETRY_S:
            return False  # bus down: answer now (503 or open), never wait out JetStream timeouts
        async with self._lock:
            if self.limiter is None:
                try:
                    await self.start()
                except Exception as e:
                    self._failed_at = time.monotonic()
                    log.warning("keys, limits and bus metrics are not available yet: %r", e)
                    await self.stop()
                    return False
        return True

    async def start(self) -> None:
        bucket, again = self.client.bucket, self.client.reconnects
        view = MetricsView(await bucket(ensure_metrics_bucket), again)
        keys = KeyStore(await bucket(ensure_keys_bucket), again)
        limits, usage = await bucket(ensure_limits_bucket), await bucket(ensure_usage_bucket)
        limiter = Limiter(limits, usage, self.gateway_id, again)
        try:
            await view.start()
            await keys.start()
            await limiter.start()
        except BaseException:
            for part in (limiter, keys, view):
                with contextlib.suppress(Exception):
                    await part.stop()
            raise
        self.view, self.keys, self.limiter = view, keys, limiter
        self.metrics.registry.register(BusCollector(view, self.client))

    async def stop(self) -> None:
        for part in (self.limiter, self.keys, self.view):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        self.limiter = self.keys = self.view = None


async def admit(request: Request, model: str) -> Lease | None:
    """A lease when the caller used a managed key (limits checked), None for static keys and open gateways."""
    record = request.scope.get("state", {}).get("api_key")
    if record is None:
        return None
    ops: GatewayOps = request.app.state.ops
    if not await ops.ready() or ops.limiter is None:
        raise BusUnavailable("the gateway cannot reach the key limits on the bus yet; retry shortly")
    try:
        return await ops.limiter.admit(record, model)
    except ApiError as e:
        ops.metrics.limited.labels(record.name, e.code or str(e.status)).inc()
        raise


def count_failovers(ops: GatewayOps, streams: list[ChatStream]) -> None:
    """Attempts beyond the first of each answer: it moved to another node (or was retried on one)."""
    moved = sum(max(0, len(s.attempts) - 1) for s in streams)
    if moved:
        ops.metrics.failovers.inc(moved)


async def tracked(
    ops: GatewayOps, body: AsyncIterator[bytes], streams: list[ChatStream], lease: Lease | None, usage: object
) -> AsyncIterator[bytes]:
    """An SSE body counted as an active stream; at its end, failovers and the key's usage are counted.
    `usage()` gives (prompt, completion) tokens of the answer at that point."""
    ops.metrics.streams.inc()
    try:
        async for part in body:
            yield part
    finally:
        ops.metrics.streams.dec()
        count_failovers(ops, streams)
        if lease is not None:
            with anyio.CancelScope(shield=True):
                prompt, completion = usage()  # type: ignore[operator]
                await lease.release(prompt, completion)  # started on a node: a request, even if abandoned
