"""Following a job's events on a 3-server cluster while the server that holds the event consumer
(the leader of the events stream) is killed: the follower gets every event, once, up to the end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import LocalCluster
from test_cluster import EchoJob, echo_job

from bus import subjects
from bus.connection import connect
from bus.jobs import Jobs, JobWorker
from bus.setup import prepare_bus


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster") as c:
        yield c


async def test_job_events_survive_the_death_of_their_consumers_server(cluster: LocalCluster) -> None:
    await cluster.wait_ready()
    admin = await connect(cluster.urls, name="setup")
    await prepare_bus(admin)
    await admin.close()
    follower_nc = await connect(cluster.urls, name="follower")
    worker_nc = await connect(cluster.urls, name="worker")
    jobs = await Jobs(follower_nc).start()
    worker = JobWorker(worker_nc, "eval", echo_job, ack_wait_s=3.0)
    worker_task = asyncio.create_task(worker.run())
    try:
        job_id = await jobs.submit("eval", EchoJob(payload="through", steps=30, step_s=0.1))
        seen: list[str] = []

        async def follow() -> None:
            async for event in jobs.events(job_id):
                seen.append(event.event)

        following = asyncio.create_task(follow())
        while "progress" not in seen:
            await asyncio.sleep(0.05)
        info = await jobs.js.stream_info(subjects.JOB_EVENTS_STREAM)
        victim = next(s for s in cluster.servers if s.name == info.cluster.leader)  # type: ignore[union-attr]
        victim.kill()
        await asyncio.wait_for(following, 60)  # before the fix: consumer_info raised out of events()
        assert seen[-1] == "done", seen
        assert seen.count("progress") == 30, seen  # none lost, none twice
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker_task, 10)
        await follower_nc.close()
        await worker_nc.close()
