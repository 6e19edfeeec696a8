"""The Usage page's data, UI-free: API keys (never their secrets or hashes) and what each used, per day and model.

The `ui` credential may read the key and usage buckets; on a bus where the app's may not, it reads
them over a second connection when given one (`CHATBUS_WEB_USAGE_NATS`) and says what to do when refused. In the browser the page is for signed-in admins only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from bus import (
    BusClient,
    KeyRecord,
    KeyUsage,
    ensure_keys_bucket,
    ensure_usage_bucket,
    list_keys,
    list_usage,
    redact,
)

__all__ = ["UsageReader", "UsageReport", "admin_mark", "key_rows", "token_matches"]

READ_TIMEOUT_S = 5.0


def admin_mark(token: str) -> str:
    """What a signed-in browser's storage keeps: a hash of the token (a new token signs everyone out)."""
    return hashlib.sha256(("chatbus-web-admin:" + token).encode()).hexdigest()[:32]


def token_matches(given: str, token: str) -> bool:
    return bool(token) and hmac.compare_digest(given.strip().encode(), token.encode())


@dataclass
class UsageReport:
    keys: list[KeyRecord] = field(default_factory=list)
    usage: list[KeyUsage] = field(default_factory=list)
    error: str = ""


class UsageReader:
    """Reads `cb_keys` and `cb_usage` through `client`, or through its own connection to `url` when given."""

    def __init__(self, client: BusClient, url: str | None = None) -> None:
        self._client = client
        self._url = url
        self._own: BusClient | None = None

    async def _conn(self) -> BusClient:
        if not self._url:
            return self._client
        if self._own is None or not self._own.connected:
            self._own = await BusClient.connect(self._url, name="chatbus-webui-usage")
        return self._own

    async def read(self) -> UsageReport:
        try:
            return await asyncio.wait_for(self._read(), READ_TIMEOUT_S)
        except Exception as e:  # refused, timed out, unreachable: the page says what to do
            where = f" (as {redact(self._url)})" if self._url else ""
            return UsageReport(error=f"{type(e).__name__}: {e}{where}".strip())

    async def _read(self) -> UsageReport:
        client = await self._conn()
        keys = await list_keys(await client.bucket(ensure_keys_bucket))
        usage = await list_usage(await client.bucket(ensure_usage_bucket))
        return UsageReport(keys, usage)

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)) if t else "never"


def key_rows(report: UsageReport, now: float | None = None) -> list[dict[str, Any]]:
    """One row per key: state, limits, expiry and totals (all days, and today's UTC day)."""
    now = time.time() if now is None else now
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for u in report.usage:
        t = totals[u.key]
        t[0] += u.requests
        t[1] += u.prompt_tokens
        t[2] += u.completion_tokens
        t[3] += u.requests if u.day == today else 0
    rows = []
    for k in report.keys:
        requests, prompt, completion, today_requests = totals.get(k.name, [0, 0, 0, 0])
        rows.append(
            {
                "name": k.name,
                "state": "revoked" if k.revoked else ("live" if k.usable(now) else "expired"),
                "rpm": k.rpm or "—",
                "tpm": k.tpm or "—",
                "streams": k.max_streams or "—",
                "models": ", ".join(k.models) or "all",
                "expires": _when(k.expires_at),
                "requests": requests,
                "today": today_requests,
                "prompt": prompt,
                "completion": completion,
            }
        )
    return rows
