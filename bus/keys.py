"""API keys on the bus: create, list and revoke them (admin), hash secrets, and count with compare-and-set.

The secret is shown once at creation; `cb_keys` keeps its sha256 only. Counters (requests and tokens
per minute, usage per day) are KV entries updated with compare-and-set on the entry's revision, so
increments from many gateways at once are never lost: a writer that loses the race re-reads and
tries again.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus import subjects
from bus.codec import decode, encode
from bus.connection import bucket_entries
from bus.errors import BadRequest, BusError
from bus.schemas_keys import KeyRecord, KeyUsage

__all__ = [
    "add_usage",
    "cas_update",
    "create_key",
    "digest",
    "list_keys",
    "list_usage",
    "parse_duration",
    "revoke_key",
]

T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' → seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise BadRequest(f"duration {text!r} is not a number with s, m, h, d or w (like 30d)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


async def create_key(
    kv: KeyValue,
    name: str,
    *,
    rpm: int = 0,
    tpm: int = 0,
    max_streams: int = 0,
    models: list[str] | None = None,
    expires_in_s: float = 0.0,
) -> tuple[str, KeyRecord]:
    """A new key named `name` (unique among live keys): its secret, shown only now, and its record."""
    if not _NAME.match(name):
        raise BadRequest(f"key name {name!r}: 1-64 letters, digits, '_', '-', '.', starting alphanumeric")
    if min(rpm, tpm, max_streams, expires_in_s) < 0:
        raise BadRequest("limits and the expiry must be >= 0")
    secret = "sk-cb-" + secrets.token_urlsafe(32)
    now = time.time()
    record = KeyRecord(
        name=name,
        sha256=digest(secret),
        rpm=rpm,
        tpm=tpm,
        max_streams=max_streams,
        models=list(models or []),
        created_at=now,
        expires_at=now + expires_in_s if expires_in_s else 0.0,
    )
    key = subjects.key_record(name)
    try:
        old = await kv.get(key)
    except KeyNotFoundError:
        old = None
    if old is not None and not decode(old.value or b"", KeyRecord).revoked:
        raise BadRequest(f"a key named {name!r} exists; revoke it first or pick another name")
    try:
        if old is None:
            await kv.create(key, encode(record))
        else:
            await kv.update(key, encode(record), last=old.revision)
    except KeyWrongLastSequenceError:
        raise BadRequest(f"a key named {name!r} was created at the same time; try again") from None
    return secret, record


async def list_keys(kv: KeyValue) -> list[KeyRecord]:
    return [decode(e.value or b"", KeyRecord) for e in await bucket_entries(kv)]


async def revoke_key(kv: KeyValue, name: str) -> KeyRecord:
    """Mark the key revoked (kept as a record, so every gateway's watch sees the change)."""

    def revoke(record: KeyRecord | None) -> KeyRecord:
        if record is None:
            raise BadRequest(f"no key named {name!r}")
        return msgspec.structs.replace(record, revoked=True)

    return await cas_update(kv, subjects.key_record(name), KeyRecord, revoke)


async def cas_update(
    kv: KeyValue, key: str, type_: type[T], change: Callable[[T | None], T], attempts: int = 50
) -> T:
    """Read `key`, apply `change` (None when absent) and write it back only if nobody wrote in between;
    else read again. Returns what was written. `change` may raise to give up (nothing is written)."""
    for _ in range(attempts):
        try:
            entry = await kv.get(key)
            current, revision = decode(entry.value or b"", type_), entry.revision
        except KeyNotFoundError:
            current, revision = None, 0
        new = change(current)
        try:
            if revision:
                await kv.update(key, msgspec.json.encode(new), last=revision)
            else:
                await kv.create(key, msgspec.json.encode(new))
            return new
        except KeyWrongLastSequenceError:
            continue
    raise BusError(f"{key}: {attempts} writers in a row changed it first; giving up")


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


async def add_usage(
    kv: KeyValue, key_name: str, model: str, prompt_tokens: int, completion_tokens: int, at: float
) -> KeyUsage:
    day = _day(at)

    def add(u: KeyUsage | None) -> KeyUsage:
        u = u or KeyUsage(key=key_name, model=model, day=day)
        return KeyUsage(
            key=key_name,
            model=model,
            day=day,
            requests=u.requests + 1,
            prompt_tokens=u.prompt_tokens + prompt_tokens,
            completion_tokens=u.completion_tokens + completion_tokens,
        )

    return await cas_update(kv, subjects.usage_key(key_name, day, model), KeyUsage, add)


async def list_usage(kv: KeyValue, key_name: str | None = None) -> list[KeyUsage]:
    prefix = f"{subjects.kv_token(key_name)}." if key_name else ""
    rows = [decode(e.value or b"", KeyUsage) for e in await bucket_entries(kv, prefix)]
    return sorted(rows, key=lambda u: (u.key, u.day, u.model))
