"""Connecting to NATS with sane settings, and creating the streams and buckets idempotently."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from bus import subjects
from bus.auth import credential_of, redact
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

    The URL carries everything needed to get in, like a database DSN: `user:password@` (its replies
    then use the inbox prefix `_INBOX_<user>` that the server's permissions expect), `tls://` for
    TLS, and options after `?`: `ca=` (CA bundle to trust), `cert=` and `key=` (a client
    certificate), `creds=` (a NATS JWT .creds file instead of a password).
    """
    servers, options = _parse_url(url)
    shown = redact(url)
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(e: Exception) -> None:
        if "authorization" in str(e).lower() and not refused.done():
            refused.set_result(e)  # a wrong password never heals: say so now, not after the timeout
        log.debug("nats: %s", e)

    async def on_disconnect() -> None:
        log.info("nats: disconnected from %s", shown)

    async def on_reconnect() -> None:
        log.warning("nats: reconnected to %s", shown)

    connecting = asyncio.ensure_future(
        nats.connect(
            servers,
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
            **options,
        )
    )
    racing: list[asyncio.Future[Any]] = [connecting, refused]
    done, _ = await asyncio.wait(racing, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if connecting in done and connecting.exception() is None:
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    if refused.done():
        raise BusUnavailable(
            f"NATS at {shown} refused our credentials ({refused.result()}); use the URL `chatbus up` "
            f"wrote to its state dir, or ask the operator for a credential of the right role"
        )
    error = connecting.exception() if connecting in done else TimeoutError()
    raise BusUnavailable(
        f"cannot reach NATS at {shown} ({type(error).__name__}); start one with `chatbus up` "
        f"or pass --nats nats://HOST:PORT of a running server"
    ) from error


def _parse_url(url: str) -> tuple[list[str], dict[str, Any]]:
    """(server URLs without credentials, nats.connect options) from a chatbus NATS URL."""
    url, _, query = url.partition("?")
    opts = dict(parse_qsl(query))
    unknown = set(opts) - {"ca", "cert", "key", "creds"}
    if unknown:
        raise ValueError(f"unknown NATS URL option(s) {', '.join(sorted(unknown))}: use ca, cert, key, creds")
    user, password = credential_of(url)
    servers = []
    for part in (u.strip() for u in url.split(",") if u.strip()):
        s = urlsplit(part)
        servers.append(urlunsplit(s._replace(netloc=s.netloc.rpartition("@")[2])))
    options: dict[str, Any] = {}
    if user is not None:
        options.update(user=user, password=password or "", inbox_prefix=subjects.inbox_prefix(user))
    if "creds" in opts:
        options["user_credentials"] = opts["creds"]
    if "ca" in opts or "cert" in opts or any(s.startswith("tls://") for s in servers):
        tls = ssl.create_default_context(cafile=opts.get("ca"))
        if "cert" in opts:
            tls.load_cert_chain(opts["cert"], opts.get("key"))
        options["tls"] = tls
    return servers, options


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
