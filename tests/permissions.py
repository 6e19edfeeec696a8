"""Asking a real nats-server what a credential may do: one publish or subscribe, and its refusals."""

from __future__ import annotations

import asyncio

import msgspec
import nats

from bus import subjects
from bus.connection import connect
from bus.jobs import JobContext, Jobs, JobWorker
from bus.tokens import creds_in

__all__ = ["refusals", "refused", "runs_an_eval_job"]


async def refusals(url: str, action: str, subject: str) -> list[str]:
    """The permission errors the server sends for one publish (`pub`) or subscribe (`subject [queue]`)
    with the credential in `url`: a role's password in the URL, or an issued credential file."""
    creds = creds_in(url)
    if creds is not None:
        user, password = creds.user, creds.password
    else:
        user, password = url.split("//", 1)[1].split("@", 1)[0].split(":", 1)
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    host = url.split("@")[-1].split("?")[0].split("//")[-1]
    nc = await nats.connect(
        f"nats://{host}",
        user=user,
        password=password,
        inbox_prefix=subjects.inbox_prefix(user),
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        if action == "pub":
            await nc.publish(subject, b"{}")
        else:
            name, _, queue = subject.partition(" ")
            await nc.subscribe(name, queue=queue)
        await nc.flush()
        for _ in range(50):
            if errors:
                break
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
    return [e for e in errors if "permissions violation" in e.lower()]


async def refused(url: str, action: str, subject: str) -> bool:
    return bool(await refusals(url, action, subject))


async def runs_an_eval_job(submitter_url: str, worker_url: str) -> None:
    """An eval job submitted with `submitter_url`'s credential is taken and finished by a worker
    connected with `worker_url`'s (fails the test otherwise)."""
    ui = await connect(submitter_url, name="test-submitter")
    nc = await connect(worker_url, name="test-worker")

    async def handler(ctx: JobContext) -> msgspec.Raw:
        return msgspec.Raw(b'{"ok": true}')

    worker = JobWorker(nc, "eval", handler)
    running = asyncio.create_task(worker.run())
    try:
        jobs = await Jobs(ui).start()
        job_id = await jobs.submit("eval", msgspec.Struct())
        events = [e async for e in jobs.events(job_id)]
        assert events[-1].state == "done" and events[-1].result == {"ok": True}, events
    finally:
        worker.stop()
        await running
        await ui.close()
        await nc.close()
