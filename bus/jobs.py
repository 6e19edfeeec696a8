"""Jobs on the bus: submit, follow, list, cancel; a worker loop with in-progress acks; artifacts.

Train and eval jobs sit in the work-queue stream CB_JOBS until one worker of their kind pulls them.
A worker keeps its job alive with in-progress acks; if it dies, the job is redelivered after the
ack wait and the handler resumes from its last checkpoint (`JobContext.attempt` > 1). Progress goes
to `cb.jobevt.<id>` (replayable by any UI) and the job's summary to the `cb_jobs` KV bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from bus import subjects
from bus.codec import decode, encode
from bus.connection import bucket_entries, ensure_bucket, ensure_object_store, ensure_stream
from bus.errors import BadRequest, JobCancelled
from bus.schemas_jobs import TERMINAL_STATES, JobEvent, JobKind, JobRecord, JobState, JobSubmit

__all__ = ["JobCancelled", "JobContext", "JobWorker", "Jobs"]

log = logging.getLogger(__name__)

ACK_WAIT_S = 30.0  # a dead worker's job is redelivered after this long
MAX_ATTEMPTS = 10  # deliveries of one job (crashes and hand-backs) before it is marked failed
BUS_RETRY_S = 30.0  # how long job bookkeeping retries a write the bus refuses
T = TypeVar("T")


def _key(job_id: str) -> str:
    """The job's key in JOBS_BUCKET (KV keys allow fewer characters than subjects)."""
    return subjects.safe_token(job_id).replace("%", "_")


async def _through_elections(call: Callable[[], Awaitable[T]]) -> T:
    """A bus write of job bookkeeping, retried for a while: in a cluster a stream has no leader for
    a few seconds after its server dies, and a job must not fail for that."""
    deadline = time.monotonic() + BUS_RETRY_S
    while True:
        try:
            return await call()
        except (NoStreamResponseError, NoRespondersError, NatsTimeout, ServiceUnavailableError) as e:
            if time.monotonic() > deadline:
                raise
            log.info("job bookkeeping: %r; retrying", e)
            await asyncio.sleep(0.5)


async def ensure_job_streams(js: JetStreamContext) -> None:
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.JOBS_STREAM,
            subjects=[subjects.jobs_all()],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        ),
    )
    await ensure_stream(
        js,
        StreamConfig(
            name=subjects.JOB_EVENTS_STREAM,
            subjects=[subjects.job_events_all()],
            storage=StorageType.FILE,
            max_age=30 * 24 * 3600.0,
        ),
    )


class Jobs:
    """The client side: what `chatbus train/eval ...` and the UIs use."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self._kv: KeyValue | None = None
        self._obs: ObjectStore | None = None

    async def start(self) -> Jobs:
        await ensure_job_streams(self.js)
        self._kv = await ensure_bucket(
            self.js, KeyValueConfig(bucket=subjects.JOBS_BUCKET, storage=StorageType.FILE, history=1)
        )
        self._obs = await ensure_object_store(
            self.js, ObjectStoreConfig(bucket=subjects.ARTIFACTS_BUCKET, storage=StorageType.FILE)
        )
        return self

    async def attach(self) -> Jobs:
        """The job records and artifacts as they are, creating nothing: for credentials that may
        only read them (a node fetching an adapter, bus/artifacts.py)."""
        self._kv = await self.js.key_value(subjects.JOBS_BUCKET)
        self._obs = await self.js.object_store(subjects.ARTIFACTS_BUCKET)
        return self

    @property
    def records(self) -> KeyValue:
        """The job records' KV bucket (after start or attach), for a live view such as `KVMirror`."""
        if self._kv is None:
            raise RuntimeError("Jobs.records before start() or attach()")
        return self._kv

    # ------------------------------------------------------------------ submit / follow

    async def submit(
        self, kind: JobKind, spec: msgspec.Struct, *, job_id: str | None = None, by: str = ""
    ) -> str:
        job_id = job_id or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        raw = msgspec.Raw(encode(spec))
        now = time.time()
        await self.put_record(
            JobRecord(job_id=job_id, kind=kind, state="queued", submitted_at=now, updated_at=now, spec=raw)
        )
        await self.publish_event(JobEvent(job_id=job_id, state="queued", event="queued", at=now))
        submit = JobSubmit(job_id=job_id, kind=kind, spec=raw, submitted_at=now, submitted_by=by)
        await _through_elections(
            lambda: self.js.publish(
                subjects.job(kind, job_id),
                encode(submit),
                stream=subjects.JOBS_STREAM,
                headers={"Nats-Msg-Id": f"{job_id}@{now}"},  # a retry after a lost ack queues it once
            )
        )
        return job_id

    async def events(
        self, job_id: str, *, follow: bool = True, idle_timeout: float | None = None, past_end: bool = False
    ) -> AsyncIterator[JobEvent]:
        """Replay the job's events from the start; with `follow`, wait for more until a terminal one.
        With `past_end` a terminal event does not end the replay: events appended to a finished job
        (a train job's `eval` and `evaluated`, judge/loop.py) come too.

        The consumer lives on one server: when it dies with its cluster member (or the connection
        is re-established), a new one replays from the start and the events seen are skipped.
        """
        seen, waited = 0, 0.0
        while True:
            sub = await _through_elections(lambda: self._event_consumer(job_id))
            try:
                index = 0
                while True:
                    try:
                        msg = await sub.next_msg(timeout=1.0)
                    except NatsTimeout:
                        waited += 1.0
                        try:
                            pending = (await sub.consumer_info()).num_pending
                        except Exception as e:  # gone with its server, or no leader right now
                            log.info("job %s: event consumer lost (%r); following anew", job_id, e)
                            break
                        if (not follow and pending == 0) or (idle_timeout and waited >= idle_timeout):
                            return
                        continue
                    index += 1
                    if index <= seen:
                        continue  # replayed by a new consumer
                    seen, waited = index, 0.0
                    event = decode(msg.data, JobEvent)
                    yield event
                    if event.state in TERMINAL_STATES and event.event != "queued" and not past_end:
                        return
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if idle_timeout and waited >= idle_timeout:
                return
            await asyncio.sleep(0.5)

    async def _event_consumer(self, job_id: str) -> JetStreamContext.PushSubscription:
        return await self.js.subscribe(
            subjects.job_events(job_id),
            stream=subjects.JOB_EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            idle_heartbeat=1.0,  # nats-py re-creates a consumer that stopped beating (its server died)
        )

    async def get(self, job_id: str) -> JobRecord | None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(_key(job_id))
        except Exception:
            return None
        return decode(entry.value, JobRecord) if entry.value else None

    async def get_revision(self, job_id: str) -> tuple[JobRecord, int] | None:
        """The record with its KV revision, for `update_record`'s compare-and-set."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(_key(job_id))
        except Exception:
            return None
        return (decode(entry.value, JobRecord), entry.revision or 0) if entry.value else None

    async def update_record(self, record: JobRecord, revision: int) -> bool:
        """Write `record` only if nobody wrote it since `revision`; False when somebody did."""
        assert self._kv is not None
        try:
            await self._kv.update(_key(record.job_id), encode(record), last=revision)
        except Exception:  # wrong last revision: another writer came first
            return False
        return True

    async def list(self, kind: JobKind | None = None) -> list[JobRecord]:
        assert self._kv is not None
        records = [decode(e.value, JobRecord) for e in await bucket_entries(self._kv) if e.value]
        return sorted((r for r in records if kind is None or r.kind == kind), key=lambda r: r.submitted_at)

    async def cancel(self, job_id: str) -> JobRecord:
        record = await self.get(job_id)
        if record is None:
            raise BadRequest(f"no job {job_id!r}; `chatbus train list` / `chatbus eval list` show the jobs")
        if record.state in TERMINAL_STATES:
            return record
        if record.state == "queued":  # no worker has it: the worker that pulls it will skip it
            record = msgspec.structs.replace(record, state="cancelled", updated_at=time.time())
            await self.put_record(record)
            await self.publish_event(
                JobEvent(job_id=job_id, state="cancelled", event="cancelled", at=time.time())
            )
        await self.nc.publish(subjects.job_control(job_id), b"cancel")
        return record

    # ------------------------------------------------------------------ records and events

    async def put_record(self, record: JobRecord) -> None:
        assert self._kv is not None
        kv = self._kv
        await _through_elections(lambda: kv.put(_key(record.job_id), encode(record)))

    async def publish_event(self, event: JobEvent) -> None:
        await _through_elections(
            lambda: self.js.publish(
                subjects.job_events(event.job_id), encode(event), stream=subjects.JOB_EVENTS_STREAM
            )
        )

    # ------------------------------------------------------------------ artifacts

    async def put_artifact(self, prefix: str, data: bytes) -> str:
        """Store `data` under a content address (deduplicated by digest); returns its name."""
        assert self._obs is not None
        name = f"{prefix}/{hashlib.sha256(data).hexdigest()[:24]}"
        try:
            await self._obs.get_info(name)
            return name
        except NotFoundError:
            pass
        except Exception as e:
            if "not found" not in str(e).lower():
                raise
        await self._obs.put(name, data)
        return name

    async def put_named(self, name: str, data: bytes) -> str:
        assert self._obs is not None
        await self._obs.put(name, data)
        return name

    async def delete_artifact(self, name: str) -> None:
        """Drop a named artifact (a checkpoint once its job is done); gone already is fine."""
        assert self._obs is not None
        with contextlib.suppress(NotFoundError):
            await self._obs.delete(name)

    async def get_artifact(self, name: str) -> bytes:
        assert self._obs is not None
        try:
            result = await self._obs.get(name)
        except NotFoundError:
            raise BadRequest(f"no artifact {name!r} in the object store") from None
        return bytes(result.data or b"")

    async def has_artifact(self, name: str) -> bool:
        assert self._obs is not None
        try:
            await self._obs.get_info(name)
            return True
        except Exception:
            return False

    async def get_artifact_to(self, name: str, path: Path) -> Path:
        data = await self.get_artifact(name)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(write)
        return path


@dataclass
class JobContext:
    """What a handler gets: its job, a way to report, and the cancel flag."""

    jobs: Jobs
    submit: JobSubmit
    attempt: int
    loop: asyncio.AbstractEventLoop
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)  # the user cancelled the job
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # the worker shuts down: hand it back

    @property
    def job_id(self) -> str:
        return self.submit.job_id

    async def emit(self, event: str, *, state: JobState = "running", **fields: Any) -> None:
        """Update the job's record, then publish the event (so a follower seeing it finds the record current)."""
        ev = JobEvent(
            job_id=self.job_id, state=state, event=event, at=time.time(), attempt=self.attempt, **fields
        )
        record = await self.jobs.get(self.job_id)
        if record is not None:
            updates: dict[str, Any] = {"state": state, "updated_at": ev.at, "attempt": self.attempt}
            for key in ("message", "progress", "metrics", "artifacts", "result"):
                if key in fields:
                    updates[key] = fields[key]
            await self.jobs.put_record(msgspec.structs.replace(record, **updates))
        await self.jobs.publish_event(ev)

    def emit_threadsafe(self, event: str, **fields: Any) -> None:
        """From a worker thread (a training loop): fire and forget onto the event loop."""
        asyncio.run_coroutine_threadsafe(self.emit(event, **fields), self.loop)

    @property
    def should_stop(self) -> bool:
        """For loops in worker threads: stop at the next safe point (after a checkpoint, ideally)."""
        return self.cancelled.is_set() or self.stopping.is_set()

    def check_cancelled(self) -> None:
        if self.should_stop:
            raise JobCancelled(self.job_id)


Handler = Callable[[JobContext], Awaitable[msgspec.Raw | None]]


class JobWorker:
    """Pulls jobs of one kind, one at a time, and runs `handler` on each."""

    def __init__(self, nc: NATS, kind: JobKind, handler: Handler, *, ack_wait_s: float = ACK_WAIT_S) -> None:
        self.nc = nc
        self.kind = kind
        self.handler = handler
        self.ack_wait_s = ack_wait_s
        self.jobs = Jobs(nc)
        self._stop = asyncio.Event()
        self.current: JobContext | None = None

    async def run(self) -> None:
        await self.jobs.start()
        durable = subjects.job_workers(self.kind)
        config = ConsumerConfig(
            name=durable,  # a named create carries its filter in the subject: permissions can pin a kind
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=-1,  # we count attempts ourselves, so the record says why a job gave up
            filter_subject=subjects.jobs_of(self.kind),
            max_ack_pending=1000,
        )
        # Create or update: a worker started with another --ack-wait changes the shared durable.
        await self.jobs.js.add_consumer(subjects.JOBS_STREAM, config)
        sub = await self.jobs.js.pull_subscribe(
            subjects.jobs_of(self.kind), durable=durable, stream=subjects.JOBS_STREAM, config=config
        )
        try:
            while not self._stop.is_set():
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except (NatsTimeout, TimeoutError):
                    continue
                except Exception as e:  # the server went away: keep trying
                    log.warning("%s worker: fetch failed (%r)", self.kind, e)
                    await asyncio.sleep(1.0)
                    continue
                for msg in msgs:
                    try:
                        await self._run_one(msg)
                    except Exception:  # bookkeeping failed (bus trouble): the job is redelivered
                        log.exception("%s worker: job bookkeeping failed", self.kind)
        finally:  # a pull subscription left open makes a later nc.drain() wait its whole timeout (30 s)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def stop(self) -> None:
        self._stop.set()
        if self.current is not None:
            self.current.stopping.set()

    async def _run_one(self, msg: Msg) -> None:
        submit = decode(msg.data, JobSubmit)
        attempt = msg.metadata.num_delivered or 1
        record = await self.jobs.get(submit.job_id)
        if record is not None and record.state in TERMINAL_STATES:
            await msg.ack()  # cancelled while queued, or a stale redelivery of a finished job
            return
        ctx = JobContext(self.jobs, submit, attempt, asyncio.get_running_loop())
        if attempt > MAX_ATTEMPTS:
            message = f"gave up after {MAX_ATTEMPTS} attempts (each worker died or stopped while running it)"
            await ctx.emit("failed", state="failed", message=message)
            await msg.ack()
            return
        self.current = ctx

        async def on_cancel(_msg: Msg) -> None:
            ctx.cancelled.set()

        ctl = await self.nc.subscribe(subjects.job_control(submit.job_id), cb=on_cancel)
        keeper = asyncio.create_task(self._keep_alive(msg))
        try:
            await ctx.emit("started", message=f"attempt {attempt}" if attempt > 1 else "")
            result = await self.handler(ctx)
            await ctx.emit("done", state="done", progress=1.0, result=result)
        except asyncio.CancelledError:
            raise  # torn down like a killed process: no ack, the job is redelivered after ack_wait
        except JobCancelled:
            if not ctx.cancelled.is_set():  # the worker is stopping: another one resumes the job
                await ctx.emit("log", state="queued", message="worker stopped; the job will resume elsewhere")
                keeper.cancel()
                await msg.nak()
                return
            await ctx.emit("cancelled", state="cancelled", message="cancelled")
        except Exception as e:
            log.exception("job %s failed", submit.job_id)
            await ctx.emit("failed", state="failed", message=f"{type(e).__name__}: {e}")
        finally:
            keeper.cancel()
            with contextlib.suppress(Exception):
                await ctl.unsubscribe()
            self.current = None
        await msg.ack()

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.ack_wait_s / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()
