"""The node's bus adapter: turns bus requests into Engine calls and Engine deltas into token streams.

Knows NATS, not torch. One engine per node; the engine's worker thread hands deltas over through
`loop.call_soon_threadsafe` into one ordered pump, which publishes them without waiting for acks
(`publish_async`), so JetStream round-trips never sit on the decode path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from bus import prompts, subjects
from bus.codec import decode, encode
from bus.connection import HEARTBEAT_S
from bus.errors import BadRequest, BusError, Code, ContextLengthExceeded
from bus.publisher import RecordPublisher
from bus.schemas import (
    Accepted,
    Cancel,
    Chunk,
    ControlMessage,
    CountRequest,
    Done,
    EmbedRequest,
    Failed,
    GenerateRequest,
    KeepAlive,
    ModelCard,
    NodeInfo,
    Probe,
    ProbeReply,
    Rejected,
    StreamEvent,
    Usage,
)
from bus.setup import node_objects
from node.engine import Delta, Engine, EngineRequest
from node.metrics import MetricsRecorder
from node.replies import answer, count_tokens, embed

__all__ = ["NodeService", "new_node_id"]

log = logging.getLogger(__name__)

MAX_ADVERTISED_PREFIXES = 512  # newest last: ~4.6 KB of heartbeat at most


def new_node_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:24]
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass
class _Job:
    request_id: str
    deadline: float
    keepalive_s: float
    subject: str  # its token stream
    last_seen: float = field(default_factory=time.monotonic)
    seq: int = 0
    prompt_tokens: int = 0
    end_code: Code | None = None  # why we cancelled it, if we did


def validate(req: GenerateRequest) -> None:
    """Reject what no engine could honour, with a message that names the field."""
    p = req.params
    subjects.check_name(req.request_id, "request_id")  # both become subject tokens
    subjects.check_name(req.owner or subjects.ANONYMOUS, "owner")
    if not (req.deadline_s > 0 and req.keepalive_s > 0):
        raise BadRequest(f"deadline_s and keepalive_s must be > 0, got {req.deadline_s}, {req.keepalive_s}")
    if req.messages is None and req.prompt is None:
        raise BadRequest("either messages or prompt is required")
    if req.messages is not None and not req.messages:
        raise BadRequest("messages must not be empty")
    for problem in p.problems()[:1]:  # the bus contract's one rule for sampling ranges
        raise BadRequest(problem)


class NodeService:
    def __init__(self, nc: NATS, engine: Engine, *, node_id: str | None = None, max_queued: int = 64) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.engine = engine
        self.node_id = node_id or new_node_id()
        self.max_queued = max_queued
        self.started_at = time.time()
        self._jobs: dict[str, _Job] = {}
        self._deltas: asyncio.Queue[Delta] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._subs: list[object] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._by_reference: set[asyncio.Task[None]] = set()  # admissions of prompts sent by reference
        self._accepting = False
        self._kv: KeyValue | None = None
        self._repair: asyncio.Task[None] | None = None
        self._records = RecordPublisher(self.js, on_failure=self._on_bus_failure)
        self.metrics = MetricsRecorder(engine, self.node_id)
        # Names beside the base, each with its subscriptions: adapters and aliases (`--model-names`).
        self._served: dict[str, tuple[ModelCard, list[Any]]] = {}
        self._aliases: set[str] = set()  # served names that are the base itself
        self._beating = asyncio.Lock()  # a withdrawn adapter's key is never put back by a beat in flight

    @property
    def model(self) -> str:
        return self.engine.card.name

    # ------------------------------------------------------------------ lifecycle

    @property
    def key(self) -> str:
        """Our heartbeat's key in the node table (per node and model: bus/auth.py pins it)."""
        return subjects.node_key(self.node_id, self.model)

    async def start(self) -> None:
        self._kv = await node_objects(self.js)  # the admin setup creates them (bus/setup.py)
        self.engine.start()
        self._tasks = [
            asyncio.create_task(self._pump(), name="node-pump"),
            asyncio.create_task(self._heartbeat_loop(), name="node-heartbeat"),
            asyncio.create_task(self._watchdog(), name="node-watchdog"),
            asyncio.create_task(self.metrics.run(self.js), name="node-metrics"),
        ]
        self._accepting = True
        self._subs = [
            await self.nc.subscribe(
                subjects.gen(self.model), queue=subjects.NODE_QUEUE, cb=self._on_generate
            ),
            await self.nc.subscribe(subjects.gen_node(self.model, self.node_id), cb=self._on_generate),
            await self.nc.subscribe(subjects.ctl(self.node_id), cb=self._on_control),
            await self.nc.subscribe(subjects.count(self.model), queue=subjects.NODE_QUEUE, cb=self._on_count),
        ]
        if self.engine.card.can_embed:
            self._subs.append(
                await self.nc.subscribe(
                    subjects.embed(self.model), queue=subjects.NODE_QUEUE, cb=self._on_embed
                )
            )
        await self._heartbeat()
        await self.nc.flush()
        log.info("node %s serving %s on %s", self.node_id, self.model, self.engine.device)

    async def drain(self, timeout: float = 30.0) -> None:
        """Stop taking work, deregister, let running answers finish (up to `timeout`), then stop."""
        self._accepting = False
        subs: list[Any] = [*self._subs[:2], *(s for _, subs in self._served.values() for s in subs[:2])]
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._kv is not None:
            for key in [self.key, *(subjects.node_key(self.node_id, name) for name in self._served)]:
                with contextlib.suppress(Exception):
                    await self._kv.delete(key)
        deadline = time.monotonic() + timeout
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in self._jobs.values():
            job.end_code = Code.SHUTTING_DOWN
        await asyncio.to_thread(self.engine.stop)
        while self._jobs and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.metrics.withdraw(self.js)
        await self._records.flush(5)
        await self._records.close()

    # ------------------------------------------------------------------ requests

    async def _on_generate(self, msg: Msg) -> None:
        """Answer Accepted or Rejected; whatever arrives, never let it take the node down."""

        async def admit(req: GenerateRequest) -> Accepted | Rejected:
            fresh = req.request_id not in self._jobs and self._accepting and req.model == self.model
            if req.prompt_ref is not None and fresh:
                req = await self._unpack(req)
            return self._admit(req)

        if b'"prompt_ref"' in msg.data:  # (a key: inside JSON strings quotes are escaped)
            # Read and counted before the answer: not on this subscription's queue, which would hold
            # up every request behind it for seconds.
            task = asyncio.create_task(self._answer(msg, GenerateRequest, admit))
            self._by_reference.add(task)
            task.add_done_callback(self._by_reference.discard)
            return
        await self._answer(msg, GenerateRequest, admit)

    async def _unpack(self, req: GenerateRequest) -> GenerateRequest:
        """A request whose prompt came by reference, with its prompt; one over the context is refused
        after counting it off the event loop (which keeps answering probes meanwhile), so the engine
        never tokenizes megabytes on it."""
        req = await prompts.fetch(self.js, req)
        n = await asyncio.to_thread(self.engine.count_tokens, req.messages, req.prompt)
        if n > self.engine.card.context_length:
            raise ContextLengthExceeded(
                f"prompt has {n} tokens, model context is {self.engine.card.context_length}"
            )
        return req

    async def _respond(self, msg: Msg, data: bytes) -> None:
        try:
            await msg.respond(data)
        except Exception as e:  # the asker is gone, or the bus is: nothing more to do
            log.warning("could not answer on %s: %r", msg.reply, e)

    def _admit(self, req: GenerateRequest) -> Accepted | Rejected:
        def reject(code: Code, message: str, retry_after_s: float = 0.0) -> Rejected:
            return Rejected(
                request_id=req.request_id,
                node_id=self.node_id,
                code=code.value,
                message=message,
                retry_after_s=retry_after_s,
            )

        if not self._accepting:
            return reject(Code.SHUTTING_DOWN, f"node {self.node_id} is shutting down", 1.0)
        adapter = req.model if req.model in self._served and req.model not in self._aliases else ""
        if req.model != self.model and req.model not in self._served:
            return reject(
                Code.MODEL_NOT_FOUND, f"node {self.node_id} serves {self.model!r}, not {req.model!r}"
            )
        if req.request_id in self._jobs:
            return Accepted(request_id=req.request_id, node_id=self.node_id)  # a retried request: same stream
        if len(self._jobs) >= self.engine.max_running + self.max_queued:
            return reject(Code.BUSY, f"node {self.node_id} is at capacity ({len(self._jobs)} requests)", 1.0)
        try:
            validate(req)
            job = _Job(
                req.request_id,
                time.monotonic() + req.deadline_s,
                req.keepalive_s,
                subjects.token(req.owner, req.request_id),
            )
            self._jobs[req.request_id] = job
            self.metrics.accepted(req.request_id, req.trace_id)
            engine_req = EngineRequest(
                request_id=req.request_id,
                messages=req.messages,
                prompt=req.prompt,
                params=req.params,
                continuation=req.continuation,
                constraint=req.constraint,
                tools=req.tools,
                adapter=adapter,
            )
            job.prompt_tokens = self.engine.submit(engine_req, self._sink)
        except BusError as e:
            self._jobs.pop(req.request_id, None)
            self.metrics.forget(req.request_id)
            return reject(e.code, e.message)
        except Exception as e:
            self._jobs.pop(req.request_id, None)
            self.metrics.forget(req.request_id)
            log.exception("submit failed")
            return reject(Code.INTERNAL, f"node {self.node_id} could not start the request: {e}")
        return Accepted(request_id=req.request_id, node_id=self.node_id, prompt_tokens=job.prompt_tokens)

    def _sink(self, delta: Delta) -> None:
        """Called from the engine's thread."""
        self._loop.call_soon_threadsafe(self._deltas.put_nowait, delta)

    async def _pump(self) -> None:
        """Deltas → stream events, published in order without waiting for acks."""
        while True:
            delta = await self._deltas.get()
            job = self._jobs.get(delta.request_id)
            if job is None:
                continue
            try:
                events = self._events(job, delta)
                self.metrics.delta(delta, next((e.code for e in events if isinstance(e, Failed)), None))
                for event in events:
                    rid = job.request_id  # the message id makes a publish retried after a lost ack idempotent
                    await self._records.publish(job.subject, encode(event), f"{rid}.{event.seq}")
            except Exception:  # one broken request must not stop every other stream
                log.exception("request %s: could not publish its tokens", job.request_id)
            if delta.finish_reason is not None:
                self._jobs.pop(delta.request_id, None)

    def _events(self, job: _Job, delta: Delta) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if delta.text or delta.tokens:
            job.seq += 1
            events.append(
                Chunk(
                    seq=job.seq,
                    text=delta.text,
                    tokens=delta.tokens,
                    node_id=self.node_id,
                    logprobs=delta.logprobs,
                )
            )
        if delta.finish_reason is None:
            return events
        job.seq += 1
        if delta.finish_reason == "error":
            events.append(
                Failed(seq=job.seq, code=Code.INTERNAL.value, message=delta.error, node_id=self.node_id)
            )
        elif delta.finish_reason == "cancelled" and job.end_code is not None:
            message = {
                Code.TIMEOUT: "the request ran past its deadline",
                Code.SHUTTING_DOWN: f"node {self.node_id} shut down before finishing",
            }.get(job.end_code, "cancelled by the node")
            events.append(Failed(seq=job.seq, code=job.end_code.value, message=message, node_id=self.node_id))
        else:
            usage = Usage(prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens)
            events.append(
                Done(seq=job.seq, finish_reason=delta.finish_reason, usage=usage, node_id=self.node_id)  # type: ignore[arg-type,unused-ignore]
            )
        return events

    def _on_bus_failure(self, error: BaseException) -> None:
        """A publish failed (the publisher sends it again): re-create the stream and bucket in the
        background, in case the server lost them."""
        if self._repair is None or self._repair.done():
            self._repair = asyncio.create_task(self._ensure_bus_objects())

    # ------------------------------------------------------------------ control

    async def _on_control(self, msg: Msg) -> None:
        try:
            ctl: Cancel | KeepAlive | Probe = decode(msg.data, ControlMessage)
        except BusError as e:
            log.warning("ignoring a bad control message on %s: %s", msg.subject, e)
            return
        if isinstance(ctl, Probe):  # answered here, on the loop: a node busy decoding still answers
            if msg.reply:
                # A finished request whose tokens are still being stored (a leader election) is
                # still ours: its reader must wait for them, not fail over.
                running = [r for r in ctl.request_ids if r in self._jobs or self._records.holds(f"{r}.")]
                await self._respond(msg, encode(ProbeReply(node_id=self.node_id, running=running)))
        elif isinstance(ctl, KeepAlive):
            now = time.monotonic()
            for rid in ctl.request_ids:
                if rid in self._jobs:
                    self._jobs[rid].last_seen = now
        elif ctl.request_id in self._jobs:
            self.engine.cancel(ctl.request_id)

    async def _watchdog(self) -> None:
        """A lost client or a blown deadline never leaves the engine generating."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for job in list(self._jobs.values()):
                if job.end_code is not None:
                    continue
                if now > job.deadline:
                    job.end_code = Code.TIMEOUT
                elif now - job.last_seen > job.keepalive_s:
                    job.end_code = Code.CANCELLED
                    log.info(
                        "request %s: no keep-alive for %.0fs, cancelling", job.request_id, job.keepalive_s
                    )
                else:
                    continue
                self.engine.cancel(job.request_id)

    # ------------------------------------------------------------------ heartbeat

    def info(self) -> NodeInfo:
        stats = self.engine.stats()
        return NodeInfo(
            node_id=self.node_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            models=[self.engine.card],
            device=self.engine.device,
            dtype=self.engine.dtype,
            capacity=self.engine.max_running,
            running=stats.running,
            queued=stats.queued,
            tokens_per_s=round(stats.tokens_per_s, 1),
            started_at=self.started_at,
            updated_at=time.time(),
            answers_probes=True,
            cached_prefixes=stats.cached_prefixes[:MAX_ADVERTISED_PREFIXES],
        )

    async def _heartbeat(self) -> bool:
        assert self._kv is not None
        try:
            # Bounded: a put stuck on a dead connection must not hold up the beats that keep us listed.
            info = self.info()
            async with self._beating:
                await asyncio.wait_for(self._kv.put(self.key, encode(info)), HEARTBEAT_S)
                for name, (card, _) in list(self._served.items()):  # a key per model (bus/nodes.py)
                    entry = encode(msgspec.structs.replace(info, models=[card]))
                    key = subjects.node_key(self.node_id, name)
                    await asyncio.wait_for(self._kv.put(key, entry), HEARTBEAT_S)
            return True
        except Exception as e:  # no leader for a moment (a cluster), or the bucket is gone (a restart)
            log.warning("heartbeat failed (%r); retrying", e)
            self._on_bus_failure(e)
            return False

    async def _ensure_bus_objects(self) -> None:
        try:
            self._kv = await node_objects(self.js)
        except Exception as e:
            log.warning("cannot re-create streams yet (%r)", e)

    async def _heartbeat_loop(self) -> None:
        beat = True
        while True:
            # Soon again after a miss: clients drop a node silent for NODE_TTL_S.
            await asyncio.sleep(HEARTBEAT_S if beat else 0.5)
            if self._accepting:
                beat = await self._heartbeat()

    # ------------------------------------------------------------------ adapters (node/adapter_host.py)

    @property
    def served(self) -> list[str]:
        """The adapters this node serves beside its base, by name."""
        return [name for name in self._served if name not in self._aliases]

    @property
    def aliases(self) -> list[str]:
        """Other names of the base (`--model-names`)."""
        return sorted(self._aliases)

    async def serve_model(self, card: ModelCard, alias: bool = False) -> None:
        """Take requests for `card` (an adapter the engine has loaded, or with `alias` another name of
        the base) and list it in our heartbeats."""
        if card.name in self._served or card.name == self.model:
            return
        if alias:
            self._aliases.add(card.name)
        cb = self._on_generate
        subs = [
            await self.nc.subscribe(subjects.gen(card.name), queue=subjects.NODE_QUEUE, cb=cb),
            await self.nc.subscribe(subjects.gen_node(card.name, self.node_id), cb=cb),
            await self.nc.subscribe(subjects.count(card.name), queue=subjects.NODE_QUEUE, cb=self._on_count),
        ]
        if card.can_embed:
            subs.append(
                await self.nc.subscribe(
                    subjects.embed(card.name), queue=subjects.NODE_QUEUE, cb=self._on_embed
                )
            )
        self._served[card.name] = (card, subs)
        await self.nc.flush()
        if self._accepting:
            await self._heartbeat()

    async def withdraw_model(self, name: str) -> None:
        """Stop taking requests for adapter `name` and drop its heartbeat (running answers go on)."""
        _, subs = self._served.pop(name, (None, []))
        self._aliases.discard(name)
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._kv is not None:
            async with self._beating:
                with contextlib.suppress(Exception):
                    await self._kv.delete(subjects.node_key(self.node_id, name))

    # ------------------------------------------------------------------ count / embed

    async def _on_count(self, msg: Msg) -> None:
        await self._answer(msg, CountRequest, lambda req: count_tokens(self.engine, req))

    async def _on_embed(self, msg: Msg) -> None:
        await self._answer(msg, EmbedRequest, lambda req: embed(self.engine, req))

    async def _answer(
        self, msg: Msg, type_: type, handler: Callable[[Any], Awaitable[msgspec.Struct]]
    ) -> None:
        await answer(msg, type_, handler, node_id=self.node_id, respond=self._respond)
