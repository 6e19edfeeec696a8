"""Job plumbing with a real nats-server: submit, follow, cancel, redelivery to a new worker."""

from __future__ import annotations

import asyncio

import msgspec

from bus.connection import connect
from bus.jobs import JobContext, Jobs, JobWorker


class EchoSpec(msgspec.Struct, frozen=True):
    steps: int
    step_s: float = 0.01


async def steps_handler(ctx: JobContext) -> msgspec.Raw:
    spec = msgspec.json.decode(ctx.submit.spec, type=EchoSpec)
    for i in range(spec.steps):
        ctx.check_cancelled()
        await asyncio.sleep(spec.step_s)
        await ctx.emit("progress", progress=(i + 1) / spec.steps, metrics={"step": i + 1})
    return msgspec.Raw(msgspec.json.encode({"attempt": ctx.attempt}))


async def test_submit_follow_done(nats_url: str) -> None:
    nc = await connect(nats_url, name="t")
    jobs = await Jobs(nc).start()
    worker = JobWorker(nc, "eval", steps_handler)
    task = asyncio.create_task(worker.run())
    try:
        job_id = await jobs.submit("eval", EchoSpec(steps=3))
        events = [e async for e in jobs.events(job_id)]
        assert [e.event for e in events] == ["queued", "started", "progress", "progress", "progress", "done"]
        assert events[-1].state == "done" and events[-1].result == {"attempt": 1}
        record = await jobs.get(job_id)
        assert record is not None and record.state == "done" and record.progress == 1.0
        assert job_id in [r.job_id for r in await jobs.list("eval")]
        # cancel a running job
        job2 = await jobs.submit("eval", EchoSpec(steps=500, step_s=0.02))
        async for e in jobs.events(job2):
            if e.event == "progress":
                await jobs.cancel(job2)
        assert e.state == "cancelled"
    finally:
        worker.stop()
        await task
        await nc.close()


async def test_crashed_worker_job_is_redelivered(nats_url: str) -> None:
    nc = await connect(nats_url, name="t2")
    jobs = await Jobs(nc).start()
    job_id = await jobs.submit("train", EchoSpec(steps=1000, step_s=0.01))
    doomed_nc = await connect(nats_url, name="doomed")
    doomed = JobWorker(doomed_nc, "train", steps_handler, ack_wait_s=1.0)
    crashed = asyncio.create_task(doomed.run())
    async for e in jobs.events(job_id):
        if e.event == "progress":
            break
    crashed.cancel()  # the worker dies without acking, like a killed process
    await asyncio.gather(crashed, return_exceptions=True)
    await doomed_nc.close()
    survivor = JobWorker(nc, "train", steps_handler, ack_wait_s=1.0)
    task = asyncio.create_task(survivor.run())
    try:
        attempts = set()
        async for e in jobs.events(job_id):
            attempts.add(e.attempt)
            if e.attempt >= 2 and e.event == "progress":
                await jobs.cancel(job_id)
        assert 2 in attempts
    finally:
        survivor.stop()
        await task
        await nc.close()


async def test_a_job_that_keeps_killing_workers_is_marked_failed(nats_url: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import bus.jobs

    monkeypatch.setattr(bus.jobs, "MAX_ATTEMPTS", 1)
    nc = await connect(nats_url, name="t3")
    jobs = await Jobs(nc).start()
    job_id = await jobs.submit("train", EchoSpec(steps=1000, step_s=0.01))
    doomed_nc = await connect(nats_url, name="doomed3")
    crashed = asyncio.create_task(JobWorker(doomed_nc, "train", steps_handler, ack_wait_s=1.0).run())
    async for e in jobs.events(job_id):
        if e.event == "progress":
            break
    crashed.cancel()
    await asyncio.gather(crashed, return_exceptions=True)
    await doomed_nc.close()
    survivor = JobWorker(nc, "train", steps_handler, ack_wait_s=1.0)
    task = asyncio.create_task(survivor.run())
    try:
        events = [e async for e in jobs.events(job_id)]
        assert events[-1].state == "failed" and "gave up after 1 attempts" in events[-1].message
        record = await jobs.get(job_id)
        assert record is not None and record.state == "failed"
    finally:
        survivor.stop()
        await task
        await nc.close()
