"""Connecting to NATS with sane settings, and creating the streams and buckets idempotently."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectStoreConfig, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, ServerError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from nats.protocol.parser import AUTHORIZATION_VIOLATION, PERMISSIONS_ERR

from bus import subjects
from bus.auth import credential_of, redact
from bus.errors import BusUnavailable
from bus.tokens import read_creds

__all__ = [
    "HEARTBEAT_S",
    "MAX_REPLICAS",
    "NODE_TTL_S",
    "bucket_entries",
    "cancel_and_wait",
    "cluster_size",
    "connect",
    "ensure_bucket",
    "ensure_logs_stream",
    "ensure_nodes_bucket",
    "ensure_object_store",
    "ensure_resume_bucket",
    "ensure_stream",
    "ensure_tokens_stream",
    "ensure_triggers_bucket",
    "replicas_for",
]

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and wait until it ends. Its own end (cancelled, or an error, logged) is dropped;
    a cancellation of the caller while it waits is not."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception as e:
        log.debug("a cancelled task ended with %r", e)


T = TypeVar("T")

NODE_TTL_S = 6.0  # a node that stops heartbeating is gone from `models()` after this long
HEARTBEAT_S = 2.0
TOKENS_MAX_AGE_S = 600.0  # token streams are replayable (resume) for this long
_REFUSED_TRIES = 3  # a credential refused while connecting (connect's docstring says why)
_REFUSED_WAIT_S = 0.5


async def connect(
    url: str, *, name: str, timeout: float = 5.0, on_refused: Callable[[], None] | None = None
) -> NATS:
    """Connect, or raise BusUnavailable with a message that says what to do; `on_refused` is called
    when the server refuses our credential later, on a reconnect (it was revoked).

    `url` may list several servers of a cluster, comma-separated. Pings every 5 s (the default 120 s
    hides a dead server for minutes) and reconnects forever, to any server of the cluster.

    The URL carries everything needed to get in, like a database DSN: `user:password@` (its replies
    then use the inbox prefix `_INBOX_<user>` that the server's permissions expect), `tls://` for
    TLS, and options after `?`: `ca=` (CA bundle to trust), `cert=` and `key=` (a client
    certificate), `creds=` (a credential file of `chatbus node-token create`, or a NATS JWT .creds
    file, instead of a password).

    A refused credential is tried `_REFUSED_TRIES` times in all, `_REFUSED_WAIT_S` apart: a
    server that is reloading its config (`chatbus node-token create|revoke`) refuses good ones for a
    moment (1 connect in 6 right after a revoke did, in tests/test_security_nodes.py).
    """
    for _ in range(_REFUSED_TRIES - 1):
        try:
            return await _connect_once(url, name, timeout, on_refused)
        except _Refused:
            await asyncio.sleep(_REFUSED_WAIT_S)
    return await _connect_once(url, name, timeout, on_refused)


class _Refused(BusUnavailable):
    """The server refused our credential while we connected."""


async def _connect_once(url: str, name: str, timeout: float, on_refused: Callable[[], None] | None) -> NATS:
    servers, options = _parse_url(url)
    shown = redact(url)
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(e: Exception) -> None:
        if "authorization" in str(e).lower():
            if not connecting.done():
                if not refused.done():
                    refused.set_result(e)  # a wrong password never heals: say so now, not after the timeout
            elif on_refused is not None:
                on_refused()
        log.debug("nats: %s", e)

    async def on_disconnect() -> None:
        log.info("nats: disconnected from %s", shown)

    async def on_reconnect() -> None:
        log.warning("nats: reconnected to %s", shown)

    settings: dict[str, Any] = dict(  # floats where nats-py's hints say int: it takes both
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
    nc = _Client()
    connecting = asyncio.ensure_future(nc.connect(servers, **settings))
    racing: list[asyncio.Future[Any]] = [connecting, refused]
    done, _ = await asyncio.wait(racing, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if connecting in done and connecting.exception() is None:
        return nc
    await cancel_and_wait(connecting)
    if refused.done():
        raise _Refused(
            f"NATS at {shown} refused our credentials ({refused.result()}); use the URL `chatbus up` "
            f"wrote to its state dir, or ask the operator for a credential of the right role"
        )
    error = connecting.exception() if connecting in done else TimeoutError()
    raise BusUnavailable(
        f"cannot reach NATS at {shown} ({type(error).__name__}); start one with `chatbus up` "
        f"or pass --nats nats://HOST:PORT of a running server"
    ) from error


class _Client(NATS):
    """nats-py's client, but one the server can disconnect without ending it for good.

    nats-py closes the connection for good (no reconnect, every later call fails) on any `-ERR`
    from the server but a permissions one: "maximum control line exceeded", "maximum payload
    violation", a parser error. The server drops the socket after those, exactly as when it
    restarts, so we reconnect as then (subscriptions are re-sent by nats-py; consumers and watches
    are re-created by whoever holds them, on the `reconnects` count). Wrong credentials stay final.
    """

    async def _process_err(self, err_msg: str) -> None:
        if AUTHORIZATION_VIOLATION in err_msg or PERMISSIONS_ERR in err_msg or self.is_connecting:
            await super()._process_err(err_msg)
            return
        error = nats_errors.Error("nats: " + err_msg.strip("'"))
        log.warning("nats: the server closed our connection (%s); reconnecting", error)
        await self._error_cb(error)
        await self._process_op_err(error)


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
        if not Path(opts["creds"]).is_file():
            raise BusUnavailable(
                f"no credential file {opts['creds']}: check the path after ?creds= or --creds"
            )
        try:  # a credential file of ours (`chatbus node-token create`): a user of its own
            mine = read_creds(Path(opts["creds"]))
            options.update(
                user=mine.user, password=mine.password, inbox_prefix=subjects.inbox_prefix(mine.user)
            )
        except ValueError:  # a NATS JWT .creds file (operator mode)
            options["user_credentials"] = opts["creds"]
    if "ca" in opts or "cert" in opts or any(s.startswith("tls://") for s in servers):
        tls = ssl.create_default_context(cafile=opts.get("ca"))
        if "cert" in opts:
            tls.load_cert_chain(opts["cert"], opts.get("key"))
        options["tls"] = tls
    return servers, options


MAX_REPLICAS = 3  # more copies than this buy write latency, not safety
_NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"
_INSUFFICIENT_RESOURCES = 10023  # fewer JetStream servers up than the replicas asked for


def cluster_size(nc: NATS) -> int:
    """How many servers the cluster we are connected to has; 1 for a single server or a leafnode.

    The server's INFO names its cluster and lists the client URLs of every member routed to it
    (`connect_urls`, itself included). A cluster that does not advertise them (`no_advertise`)
    counts by the seed URLs we were given. Read at connect time: a member down then counts as gone.
    """
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}  # nats-py keeps INFO privately
    if not info.get("cluster"):
        return 1
    members = set(info.get("connect_urls") or [])
    if not members:
        discovered = {u.netloc for u in nc.discovered_servers}
        members = {u.netloc for u in nc.servers} - discovered
    return max(1, len(members))


def replicas_for(js: JetStreamContext) -> int:
    """The replica count of every stream, bucket and object store: one per server, at most 3."""
    return min(MAX_REPLICAS, cluster_size(js._nc))  # nats-py keeps the context's connection private


async def _replicated(name: str, replicas: int, floor: int, call: Callable[[int], Awaitable[T]]) -> T:
    """`call(replicas)`, with fewer replicas (not below `floor`) while the servers up cannot hold them."""
    while True:
        try:
            return await call(replicas)
        except ServerError as e:
            if replicas <= max(floor, 1) or e.err_code not in (_NOT_CLUSTERED, _INSUFFICIENT_RESOURCES):
                raise
            replicas = max(floor, 1) if e.err_code == _NOT_CLUSTERED else replicas - 1
            log.warning("%s: %s; trying %d replica(s)", name, e.description, replicas)


async def _raise_replicas(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Give an existing stream `replicas` copies if it has fewer (the cluster has grown). Best
    effort: a bucket that works with fewer copies beats none, and the next start tries again."""
    if replicas <= 1:
        return
    try:
        info = await js.stream_info(stream)
        current = info.config.num_replicas or 1
        if current >= replicas:
            return
        log.info("stream %s: raising replicas %d -> %d", stream, current, replicas)
        await _replicated(
            stream,
            replicas,
            current + 1,
            lambda r: js.update_stream(dataclasses.replace(info.config, num_replicas=r)),
        )
    except Exception as e:  # a member is down, or the cluster elects a leader right now
        log.warning("stream %s: cannot raise its replicas to %d yet (%r)", stream, replicas, e)


async def ensure_stream(js: JetStreamContext, config: StreamConfig, *, disposable: bool = False) -> None:
    """Create the stream `config.name`, or bring it to `config`; replicated over the cluster, and
    never shrunk (a client that sees part of the cluster keeps the replicas the stream has)."""
    name = config.name or ""
    try:
        await _replicated(
            name, replicas_for(js), 1, lambda r: js.add_stream(dataclasses.replace(config, num_replicas=r))
        )
        return
    except BadRequestError:
        pass  # exists with another config: an older version of ours, or other replicas
    current = (await js.stream_info(name)).config.num_replicas or 1
    wanted = max(current, replicas_for(js))
    try:
        await _replicated(
            name, wanted, current, lambda r: js.update_stream(dataclasses.replace(config, num_replicas=r))
        )
    except NatsTimeout:
        # Asking roles may not update streams (bus/auth.py): the server refuses, and we hear nothing.
        log.warning("stream %s differs from ours and we may not update it; an admin can", name)
    except BadRequestError:
        if not disposable:
            raise
        # e.g. the storage type changed, which the server cannot update: the data is
        # short-lived (token streams), so start the stream afresh.
        await js.delete_stream(name)
        await _replicated(
            name, wanted, 1, lambda r: js.add_stream(dataclasses.replace(config, num_replicas=r))
        )


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
    """The KV bucket `config.bucket`, created with `config` if it does not exist yet; replicated
    over the cluster (an existing bucket gets more replicas when the cluster has grown)."""
    bucket = config.bucket or ""
    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        return await _replicated(
            bucket,
            replicas_for(js),
            1,
            lambda r: js.create_key_value(dataclasses.replace(config, replicas=r)),
        )
    await _raise_replicas(js, f"KV_{bucket}", replicas_for(js))
    return kv


async def bucket_entries(kv: KeyValue, prefix: str = "") -> list[KeyValue.Entry]:
    """The current entry of every key in `kv` under `prefix` (whole tokens, ending in "."), by key; deleted
    keys left out.
    The keys come from the stream's own subject index, not from nats-py's `kv.keys()`: that watcher can
    put its "no more keys" marker before the keys on a loaded machine and answer none (stop 24's CI)."""
    subject = f"$KV.{kv._name}."  # the KV convention (ADR-8), which nats-py keeps in private fields
    info = await kv._js.stream_info(kv._stream, subjects_filter=f"{subject}{prefix}>")
    entries = []
    for key in sorted(s.removeprefix(subject) for s in info.state.subjects or {}):
        try:
            entries.append(await kv.get(key))
        except KeyNotFoundError:  # deleted (its marker is what the index saw), or deleted since
            continue
    return entries


async def ensure_nodes_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(
        js, KeyValueConfig(bucket=subjects.NODES_BUCKET, ttl=NODE_TTL_S, storage=StorageType.FILE, history=1)
    )


async def ensure_resume_bucket(js: JetStreamContext) -> KeyValue:
    """What a gateway needs to resume a stream, kept as long as the token streams."""
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=subjects.RESUME_BUCKET, ttl=TOKENS_MAX_AGE_S, storage=StorageType.FILE, history=1
        ),
    )


async def ensure_triggers_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(
        js, KeyValueConfig(bucket=subjects.EVAL_TRIGGERS_BUCKET, storage=StorageType.FILE, history=1)
    )


async def ensure_logs_stream(js: JetStreamContext) -> None:
    """Every chat and vote of the web app: the record the leaderboard is computed from."""
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.LOGS_STREAM,
            subjects=[subjects.logs_all()],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            duplicate_window=120.0,
        ),
    )


async def ensure_object_store(js: JetStreamContext, config: ObjectStoreConfig) -> ObjectStore:
    """The object store `config.bucket`, as `ensure_bucket` does for KV."""
    bucket = config.bucket or ""
    try:
        store = await js.object_store(bucket)
    except BucketNotFoundError:
        return await _replicated(
            bucket,
            replicas_for(js),
            1,
            lambda r: js.create_object_store(bucket, dataclasses.replace(config, replicas=r)),
        )
    await _raise_replicas(js, f"OBJ_{bucket}", replicas_for(js))
    return store
