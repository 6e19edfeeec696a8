"""Managed API keys on the gateway: the live key table, and per-key limits and usage kept in the bus.

Every gateway watches `cb_keys`, so a created or revoked key holds on all of them within a watch
delivery (milliseconds). Limits are shared through `cb_limits`:

- requests per minute: one counter per key and unix minute, raised by compare-and-set before a
  request is admitted; a gateway that loses the race re-reads, so the count is exact across gateways
  (the 6th request of a 5 rpm key is refused wherever it lands).
- tokens per minute: each answer adds its prompt + completion tokens to the minute's counter when it
  ends (compare-and-set); a request is refused while the counter is at or over the limit, so one
  request may overshoot it, as with OpenAI's own estimate.
- concurrent streams: each gateway writes its own count per key and watches the others'; two
  gateways admitting in the same few milliseconds may each miss the other's last stream (at most one
  over per gateway). A dead gateway's counts expire with the bucket's TTL (LIMITS_TTL_S).

Usage (requests, prompt and completion tokens per key, day and model) is added to `cb_usage` by
compare-and-set when an answer ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from dataclasses import dataclass, field

from nats.js.kv import KeyValue

from bus import (
    LIMITS_TTL_S,
    BadMessage,
    KeyRecord,
    KVMirror,
    Reconnects,
    add_usage,
    cas_update,
    decode,
    subjects,
)
from bus import follow_bucket as follow
from bus import key_digest as digest
from gateway.errors import ApiError

__all__ = ["KeyStore", "Lease", "Limiter"]

log = logging.getLogger(__name__)


class KeyStore(KVMirror):
    """Every managed key by the sha256 of its secret, kept from a watch on `cb_keys`."""

    def __init__(self, kv: KeyValue, reconnects: Reconnects | None = None) -> None:
        super().__init__(kv, reconnects)
        self._by_name: dict[str, KeyRecord] = {}

    @property
    def active(self) -> bool:
        """Whether any key was ever made here (revoked ones count): then every request needs a key."""
        return bool(self._by_name)

    def _apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._by_name.pop(key, None)
            return
        try:
            self._by_name[key] = decode(value, KeyRecord)
        except BadMessage as e:
            log.warning("ignoring key record %s: %s", key, e)

    def lookup(self, secret: str) -> KeyRecord | None:
        wanted = digest(secret)
        found = None
        for record in self._by_name.values():  # compare every one: timing does not tell which nearly matched
            if hmac.compare_digest(wanted, record.sha256):
                found = record
        return found


@dataclass
class Lease:
    """One admitted request of a managed key: holds a stream slot until `release`."""

    limiter: Limiter
    record: KeyRecord
    model: str
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    started: float = field(default_factory=time.monotonic)
    _released: bool = False

    async def release(
        self, prompt_tokens: int = 0, completion_tokens: int = 0, answered: bool = True
    ) -> None:
        if self._released:
            return
        self._released = True
        await self.limiter.finish(self, prompt_tokens, completion_tokens, answered)


def _minute(now: float) -> int:
    return int(now // 60)


def _reset_s(now: float) -> float:
    return 60 - now % 60


class Limiter:
    """Admits requests of managed keys against their limits; counts their usage."""

    def __init__(
        self, limits: KeyValue, usage: KeyValue, gateway_id: str, reconnects: Reconnects | None = None
    ) -> None:
        self._reconnects = reconnects
        self._limits = limits
        self._usage = usage
        self._gateway = gateway_id
        # other gateways' open streams by their limits key, and when we heard it: KV expiry tells
        # watchers nothing, so a count not refreshed within the bucket's TTL (a dead gateway) is dropped
        self._others: dict[str, tuple[int, float]] = {}
        self._open: dict[int, Lease] = {}  # our leases not yet released, by id
        self._synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 5.0) -> None:
        self._tasks = [
            asyncio.create_task(
                follow(self._limits, "streams.>", self._apply, self._synced, self._reconnects)
            ),
            asyncio.create_task(self._refresh()),
        ]
        await asyncio.wait_for(self._synced.wait(), timeout)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _apply(self, key: str, value: bytes | None) -> None:
        if key.endswith("." + subjects.kv_token(self._gateway)):
            return
        if value is None:
            self._others.pop(key, None)
        else:
            with contextlib.suppress(BadMessage):
                self._others[key] = (decode(value, int), time.monotonic())

    def _own(self, name: str) -> int:
        return sum(1 for lease in self._open.values() if lease.record.name == name)

    def streams(self, name: str) -> int:
        prefix = subjects.limit_streams_of(name)[:-1]
        fresh = time.monotonic() - LIMITS_TTL_S
        others = (n for k, (n, at) in self._others.items() if k.startswith(prefix) and at > fresh)
        return self._own(name) + sum(others)

    async def _put_streams(self, name: str) -> None:
        try:
            await self._limits.put(subjects.limit_streams(name, self._gateway), str(self._own(name)).encode())
        except Exception as e:  # other gateways see our last count until the next refresh
            log.warning("could not share the open streams of key %s: %r", name, e)

    async def _refresh(self, max_lease_s: float = 900.0) -> None:
        """Re-put our open-stream counts before the bucket's TTL drops them. A lease older than any
        answer may last (the deadline is 600 s by default) was lost without a release (a body that
        never started): it stops counting."""
        while True:
            await asyncio.sleep(LIMITS_TTL_S / 3)
            now, names = time.monotonic(), set()
            for key, lease in list(self._open.items()):
                if now - lease.started > max_lease_s:
                    log.warning(
                        "key %s: a stream slot held for %.0fs was never released",
                        lease.record.name,
                        now - lease.started,
                    )
                    del self._open[key]
                if lease.record.max_streams:
                    names.add(lease.record.name)
            for name in names:
                await self._put_streams(name)

    async def admit(self, record: KeyRecord, model: str) -> Lease:
        """A lease for one request of `record` on `model`, or ApiError 403 / 429 (with Retry-After)."""
        if record.models and model not in record.models:
            raise ApiError(
                403,
                f"API key {record.name!r} may not use model {model!r}; it may use: {', '.join(record.models)}",
                type="permission_error",
                code="model_not_allowed",
                param="model",
            )
        now = time.time()
        minute, reset = _minute(now), _reset_s(now)
        headers: dict[str, str] = {}
        if record.tpm:
            used = await self._read(subjects.limit_window("tok", record.name, minute))
            headers |= _headers("tokens", record.tpm, record.tpm - used, reset)
            if used >= record.tpm:
                raise _limited(record, f"{record.tpm} tokens per minute", reset, headers)
        if record.max_streams and self.streams(record.name) >= record.max_streams:
            raise _limited(record, f"{record.max_streams} concurrent requests", 1.0, headers)
        if record.rpm:

            def take(count: int | None) -> int:
                if (count or 0) >= record.rpm:
                    headers.update(_headers("requests", record.rpm, 0, reset))
                    raise _limited(record, f"{record.rpm} requests per minute", reset, headers)
                return (count or 0) + 1

            count = await cas_update(
                self._limits, subjects.limit_window("req", record.name, minute), int, take
            )
            headers |= _headers("requests", record.rpm, record.rpm - count, reset)
        lease = Lease(self, record, model, headers)
        self._open[id(lease)] = lease
        if record.max_streams:
            await self._put_streams(record.name)
        return lease

    async def _read(self, key: str) -> int:
        try:
            return decode((await self._limits.get(key)).value or b"", int)
        except Exception:  # absent: nothing counted this minute yet
            return 0

    async def finish(self, lease: Lease, prompt_tokens: int, completion_tokens: int, answered: bool) -> None:
        name = lease.record.name
        self._open.pop(id(lease), None)
        now = time.time()
        try:
            if lease.record.max_streams:
                await self._put_streams(name)
            tokens = prompt_tokens + completion_tokens
            if lease.record.tpm and tokens:
                key = subjects.limit_window("tok", name, _minute(now))
                await cas_update(self._limits, key, int, lambda n: (n or 0) + tokens)
            if answered:
                await add_usage(self._usage, name, lease.model, prompt_tokens, completion_tokens, now)
        except Exception as e:  # the answer was given; only its accounting is lost
            log.warning("could not count usage of key %s: %r", name, e)


def _headers(kind: str, limit: int, remaining: int, reset_s: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": f"{math.ceil(reset_s)}s",
    }


def _limited(record: KeyRecord, what: str, retry_s: float, headers: dict[str, str]) -> ApiError:
    retry = max(1, math.ceil(retry_s))
    return ApiError(
        429,
        f"API key {record.name!r} is over its limit of {what}; retry in {retry}s",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={**headers, "Retry-After": str(retry)},
    )
