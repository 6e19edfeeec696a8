"""BusClient: the one API every chatbus client (gateway, TUI, web app, judge) uses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from bus import subjects
from bus.codec import decode, encode
from bus.connection import (
    connect,
    ensure_nodes_bucket,
    ensure_resume_bucket,
)
from bus.errors import BusUnavailable, ModelNotFound, NodeTimeout, error_for
from bus.jobs import Jobs
from bus.nodes import ModelEntry, NodeTable
from bus.prefixes import prefix_hashes
from bus.schemas import (
    ChatMessage,
    Constraint,
    CountReply,
    CountRequest,
    EmbedReply,
    EmbedRequest,
    GenerateRequest,
    KeepAlive,
    NodeInfo,
    Rejected,
    SamplingParams,
    ToolSpec,
)
from bus.schemas_adapters import ADAPTER_TIMEOUT_S, AdapterAnswer, AdapterCommand, AdapterReply
from bus.schemas_jobs import JobEvent, JobKind
from bus.stream import Attempt, ChatStream, new_request_id

__all__ = ["BusClient"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_RECORDS_RETRY_S = 5.0  # a cluster elects a new leader for a bucket in a few seconds


class BusClient:
    """Routing, streaming, cancel and failover over one NATS connection.

    Build it with `await BusClient.connect(url, name=...)` (or around an existing connection and
    `await client.start()`), and `await client.close()` when done.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        name: str = "chatbus-client",
        accept_timeout_s: float = 10.0,
        stall_check_s: float = 0.4,
        probe_timeout_s: float = 1.0,
        keepalive_every_s: float = 5.0,
        keepalive_s: float = 15.0,
        max_failovers: int = 2,
        owns_connection: bool = False,
        cache_aware: bool = True,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name
        self.accept_timeout_s = accept_timeout_s
        self.stall_check_s = stall_check_s  # a stream quiet this long asks its node (bus/probe.py)
        self.probe_timeout_s = probe_timeout_s  # a node that answers probes is hung after this long
        self.keepalive_s = keepalive_s  # a node cancels a request whose client is silent this long
        self.keepalive_every_s = min(keepalive_every_s, keepalive_s / 3)
        self.max_failovers = max_failovers
        self.cache_aware = cache_aware  # send a chat's next turn to the node holding its history
        # Our NATS user: nodes publish our tokens under it, and the server lets us read only those.
        self.owner = str(nc.options.get("user") or "")
        self._owns = owns_connection
        self.table: NodeTable = None  # type: ignore[assignment]  # set in start()
        self._active: dict[str, ChatStream] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._jobs: Jobs | None = None
        self._records: KeyValue | None = None

    @classmethod
    async def connect(cls, url: str, *, name: str = "chatbus-client", **options: float) -> BusClient:
        nc = await connect(url, name=name)
        client = cls(nc, name=name, owns_connection=True, **options)  # type: ignore[arg-type]
        try:
            await client.start()
        except BaseException:
            await nc.close()
            raise
        return client

    async def start(self) -> None:
        # The token stream is the nodes' to create: no asker may shape it (say, republish it to itself).
        self.table = NodeTable(await ensure_nodes_bucket(self.js), self.reconnects)
        await self.table.start()
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name="chatbus-keepalive")

    async def close(self) -> None:
        """Cancel what is still streaming, stop the background tasks, drain; each step bounded."""
        for stream in list(self._active.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.aclose(), 2.0)
        if self._keepalive:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._keepalive, 2.0)
        if self.table:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.table.stop(), 3.0)
        if self._owns:
            try:
                await asyncio.wait_for(self.nc.drain(), 5.0)
            except Exception:
                with contextlib.suppress(Exception):
                    await self.nc.close()

    async def __aenter__(self) -> BusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (1 MB by default)."""
        return int(self.nc.max_payload)

    def reconnects(self) -> int:
        """How often the connection was re-established (consumers may need re-creating after one)."""
        return int(self.nc.stats.get("reconnects", 0))

    # ------------------------------------------------------------------ discovery

    def nodes(self) -> list[NodeInfo]:
        return self.table.nodes()

    def models(self) -> dict[str, ModelEntry]:
        """Models served right now, each with its live nodes."""
        return self.table.models()

    # ------------------------------------------------------------------ generation

    def chat(
        self,
        model: str,
        messages: list[ChatMessage],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        continuation: str = "",
        deadline_s: float = 600.0,
        trace_id: str = "",
        constraint: Constraint | None = None,
        tools: list[ToolSpec] | None = None,
    ) -> ChatStream:
        """Stream a chat answer: iterate for `Chunk`s, then one `Done` or `Failed`.

        `constraint` makes the output match a schema or grammar (bus/constraints.py builds them);
        `tools` are shown to the model through its chat template.
        """
        return self._stream(
            GenerateRequest(
                request_id=request_id or new_request_id(),
                model=model,
                messages=messages,
                params=params or SamplingParams(),
                continuation=continuation,
                deadline_s=deadline_s,
                keepalive_s=self.keepalive_s,
                client=self.name,
                owner=self.owner,
                trace_id=trace_id,
                constraint=constraint,
                tools=tools or [],
            )
        )

    def complete(
        self,
        model: str,
        prompt: str,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        deadline_s: float = 600.0,
        trace_id: str = "",
    ) -> ChatStream:
        """Stream a raw completion of `prompt` (no chat template)."""
        return self._stream(
            GenerateRequest(
                request_id=request_id or new_request_id(),
                model=model,
                prompt=prompt,
                params=params or SamplingParams(),
                deadline_s=deadline_s,
                keepalive_s=self.keepalive_s,
                client=self.name,
                owner=self.owner,
                trace_id=trace_id,
            )
        )

    def prefixes_for(self, request: GenerateRequest) -> list[int]:
        """What routing looks up in the nodes' advertised prefixes (nothing when cache-unaware)."""
        if not self.cache_aware or not request.messages:
            return []
        return prefix_hashes(request.messages)

    def _stream(self, request: GenerateRequest) -> ChatStream:
        return ChatStream(self, request, self.max_failovers)

    def resume(
        self, request: GenerateRequest, attempts: list[Attempt], *, after: int = 0, prompt_tokens: int = 0
    ) -> ChatStream:
        """An answer started earlier, maybe by another process (`request` and `stream.attempts`
        saved from its stream): events after `after`, replayed from the token record, then live;
        an answer cut short (its client or node went away) is continued on a node."""
        return ChatStream.resuming(self, request, self.max_failovers, attempts, after, prompt_tokens)

    async def put_resume_record(self, key: str, data: bytes) -> None:
        """Keep `data` on the bus as long as token streams are kept (any process may resume)."""
        await self._with_records(lambda kv: kv.put(key, data))

    async def get_resume_record(self, key: str) -> bytes | None:
        try:
            entry = await self._with_records(lambda kv: kv.get(key))
        except KeyNotFoundError:
            return None
        return entry.value

    async def _with_records(self, call: Callable[[KeyValue], Awaitable[T]]) -> T:
        """`call` on the resume bucket, retried for a few seconds: in a cluster the bucket has no
        leader for a moment after its server dies, and after a server restart it may be gone."""
        deadline = time.monotonic() + _RECORDS_RETRY_S
        while True:
            try:
                return await call(await self._resume_records())
            except KeyNotFoundError:
                raise
            except Exception as e:
                self._records = None
                if time.monotonic() > deadline:
                    raise BusUnavailable(f"the resume records cannot be reached right now ({e!r})") from e
                await asyncio.sleep(0.25)

    async def _resume_records(self) -> KeyValue:
        if self._records is None:
            self._records = await ensure_resume_bucket(self.js)
        return self._records

    async def cancel(self, request_id: str) -> None:
        stream = self._active.get(request_id)
        if stream is not None:
            await stream.cancel()

    # ------------------------------------------------------------------ jobs

    async def jobs(self) -> Jobs:
        """The job API (train/eval): submit, events, list, cancel, artifacts."""
        if self._jobs is None:
            self._jobs = await Jobs(self.nc).start()
        return self._jobs

    async def submit_job(self, kind: JobKind, spec: msgspec.Struct, *, job_id: str | None = None) -> str:
        return await (await self.jobs()).submit(kind, spec, job_id=job_id, by=self.name)

    async def job_events(self, job_id: str, *, follow: bool = True) -> AsyncIterator[JobEvent]:
        async for event in (await self.jobs()).events(job_id, follow=follow):
            yield event

    # ------------------------------------------------------------------ utilities

    async def count_tokens(
        self, model: str, *, messages: list[ChatMessage] | None = None, prompt: str | None = None
    ) -> CountReply:
        reply = await self._ask(
            subjects.count(model), model, CountRequest(model=model, messages=messages, prompt=prompt)
        )
        return decode(reply, CountReply)

    async def embed(self, model: str, inputs: list[str]) -> EmbedReply:
        reply = await self._ask(subjects.embed(model), model, EmbedRequest(model=model, inputs=inputs))
        return decode(reply, EmbedReply)

    async def adapters(self, node_id: str, command: AdapterCommand) -> AdapterReply:
        """Load, unload or list the LoRA adapters of one node (`chatbus adapters`, node/adapter_host.py)."""
        try:
            msg = await self.nc.request(
                subjects.adapters(node_id), encode(command), timeout=ADAPTER_TIMEOUT_S
            )
        except NoRespondersError:
            raise NodeTimeout(
                f"node {node_id} does not answer adapter commands (gone, or an older node)"
            ) from None
        except NatsTimeout:
            raise NodeTimeout(f"node {node_id} did not answer within {ADAPTER_TIMEOUT_S:.0f}s") from None
        answer = decode(msg.data, AdapterAnswer)
        if isinstance(answer, Rejected):
            raise error_for(answer.code, answer.message)
        return answer

    async def _ask(self, subject: str, model: str, message: CountRequest | EmbedRequest) -> bytes:
        try:
            msg = await self.nc.request(subject, encode(message), timeout=self.accept_timeout_s * 3)
        except NoRespondersError:
            raise ModelNotFound(model, list(self.models())) from None
        except NatsTimeout:
            raise NodeTimeout(f"no node answered for model {model!r}") from None
        if msg.data.startswith(b'{"type":"gen.rejected"'):
            rejected = decode(msg.data, Rejected)
            raise error_for(rejected.code, rejected.message)
        return bytes(msg.data)

    # ------------------------------------------------------------------ keep-alive

    def _register(self, stream: ChatStream) -> None:
        self._active[stream.attempt_request_id] = stream

    def _unregister(self, stream: ChatStream) -> None:
        self._active.pop(stream.attempt_request_id, None)

    async def _keepalive_loop(self) -> None:
        """Tell each node which of its requests still have a listener (it cancels the rest)."""
        while True:
            await asyncio.sleep(self.keepalive_every_s)
            by_node: dict[str, list[str]] = defaultdict(list)
            for rid, stream in list(self._active.items()):
                by_node[stream.node_id].append(rid)
            for node_id, rids in by_node.items():
                try:
                    await self.nc.publish(subjects.ctl(node_id), encode(KeepAlive(request_ids=rids)))
                except Exception as e:  # disconnected: the next round tries again
                    log.debug("keepalive to %s failed: %r", node_id, e)
