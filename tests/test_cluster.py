"""chatbus on a real 3-server NATS cluster, and on a hub with a laptop joined through a leafnode.

Every server is a real nats-server (the same binary as `chatbus up`) on loopback, started and
stopped by the test. A member is SIGKILLed while chat streams and jobs are in flight: every stream
still ends with its full answer (never a Failed, never a hang), every job completes as
submitted, and the killed member rejoins.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cluster import LocalCluster, ServerProcess
from fakes import EchoEngine, echo_node, user
from nats.js.api import KeyValueConfig, StreamConfig
from procs import eventually

from bus import BusClient, ChatStream, Chunk, Done, StreamEvent, subjects
from bus.connection import cluster_size, connect, ensure_stream, replicas_for
from bus.jobs import JobContext, Jobs, JobWorker
from bus.schemas_jobs import JobEvent
from bus.setup import prepare_bus

CHATBUS_STREAMS = [
    subjects.TOKENS_STREAM,
    f"KV_{subjects.NODES_BUCKET}",
    subjects.JOBS_STREAM,
    subjects.JOB_EVENTS_STREAM,
    f"KV_{subjects.JOBS_BUCKET}",
    f"OBJ_{subjects.ARTIFACTS_BUCKET}",
]


class EchoJob(msgspec.Struct, frozen=True):
    payload: str
    steps: int = 15
    step_s: float = 0.1


async def echo_job(ctx: JobContext) -> msgspec.Raw:
    """Reports progress on the bus every step, then answers with what it was given."""
    spec = msgspec.json.decode(ctx.submit.spec, type=EchoJob)
    for i in range(spec.steps):
        ctx.check_cancelled()
        await asyncio.sleep(spec.step_s)
        await ctx.emit("progress", progress=(i + 1) / spec.steps)
    return msgspec.Raw(msgspec.json.encode({"payload": spec.payload}))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[LocalCluster]:
    """One hub server with a JetStream domain and a leafnode listener (a cluster works the same)."""
    with LocalCluster(tmp_path / "hub", size=1, with_leafnodes=True, domain="hub") as c:
        yield c


async def replica_sets(url: str, stream: str) -> tuple[int, set[str], set[str]]:
    """(replicas configured, peers, peers that are current) of `stream`."""
    nc = await connect(url, name="probe")
    try:
        info = await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()
    assert info.cluster is not None
    peers = {p.name or "" for p in info.cluster.replicas or []}
    current = {p.name or "" for p in info.cluster.replicas or [] if p.current}
    if info.cluster.leader:
        peers.add(info.cluster.leader)
        current.add(info.cluster.leader)
    return info.config.num_replicas or 1, peers, current


async def chat(
    client: BusClient, model: str, words: int, tag: str
) -> tuple[str, ChatStream, list[StreamEvent]]:
    """(the prompt, its stream, every event of it); the echo engine answers with the prompt."""
    prompt = " ".join(f"{tag}w{i}" for i in range(words))
    stream = client.chat(model, user(prompt))
    return prompt, stream, [e async for e in stream]


async def all_events(jobs: Jobs, job_id: str) -> list[JobEvent]:
    return [e async for e in jobs.events(job_id)]


async def test_streams_and_buckets_get_a_replica_per_server(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    await cluster.wait_ready()
    nc = await connect(cluster.urls, name="sizer")
    js = nc.jetstream()
    try:
        assert cluster_size(nc) == 3 and replicas_for(js) == 3
        # Made with one replica (by an older chatbus, or while the cluster was one server): raised.
        old = StreamConfig(name="CB_OLD", subjects=["cbold.>"], num_replicas=1)
        await js.add_stream(old)
        await js.create_key_value(KeyValueConfig(bucket=subjects.JOBS_BUCKET, history=1, replicas=1))
        await ensure_stream(js, StreamConfig(name="CB_OLD", subjects=["cbold.>"]))
        await prepare_bus(nc)  # every stream and bucket, as `chatbus up` makes them
        for stream in [*CHATBUS_STREAMS, "CB_OLD"]:

            async def three_peers(stream: str = stream) -> bool:
                replicas, peers, _ = await replica_sets(cluster.urls, stream)
                return replicas == 3 and len(peers) == 3

            # a raised stream gets its new peers a moment later
            await eventually(three_peers, 10, what=f"{stream} on 3 peers")
        # A client that sees one server (a laptop through a leafnode) never shrinks a stream.
        monkeypatch.setattr("bus.connection.cluster_size", lambda nc: 1)
        await ensure_stream(js, StreamConfig(name="CB_OLD", subjects=["cbold.>"], max_msgs=10))
        assert (await js.stream_info("CB_OLD")).config.num_replicas == 3
        await js.delete_stream("CB_OLD")
    finally:
        await nc.close()


async def test_killing_a_server_loses_nothing(cluster: LocalCluster) -> None:
    await cluster.wait_ready()
    client = await BusClient.connect(cluster.urls, name="cluster-client", stall_check_s=1.0)
    jobs_nc = await connect(cluster.urls, name="submitter")
    worker_nc = await connect(cluster.urls, name="worker")
    jobs = await Jobs(jobs_nc).start()
    worker = JobWorker(worker_nc, "eval", echo_job, ack_wait_s=3.0)
    worker_task = asyncio.create_task(worker.run())
    leader = (await client.js.stream_info(subjects.TOKENS_STREAM)).cluster.leader  # type: ignore[union-attr]
    victim = next(s for s in cluster.servers if s.name == leader)
    try:
        # The node talks to the server that leads the token stream: the worst one to lose.
        async with echo_node(victim.url, EchoEngine("echo-c", step_s=0.05, max_running=8)):
            await eventually(lambda: "echo-c" in client.models(), 15)
            job_ids = [await jobs.submit("eval", EchoJob(payload=f"job-{i}")) for i in range(4)]
            chats = [asyncio.create_task(chat(client, "echo-c", 60, f"c{i}")) for i in range(6)]
            await asyncio.sleep(1.0)  # every answer a third of the way through
            victim.kill()
            done, stuck = await asyncio.wait(chats, timeout=45)
            assert not stuck, f"{len(stuck)} chat streams hung after {victim.name} died"
            for prompt, stream, events in [t.result() for t in done]:
                last = events[-1]  # docs/operations.md: a leader's death loses nothing, so never Failed
                assert isinstance(last, Done), last
                text = "".join(e.text for e in events if isinstance(e, Chunk))
                assert text == prompt, f"{stream.request_id}: the answer lost words"
            for i, job_id in enumerate(job_ids):
                job_events = await asyncio.wait_for(all_events(jobs, job_id), 45)
                assert job_events[-1].state == "done", job_events[-1]
                assert job_events[-1].result == {"payload": f"job-{i}"}
            # The killed server comes back with its store and catches up.
            victim.start()
            await victim.wait_jetstream()
            for name in CHATBUS_STREAMS:

                async def caught_up(name: str = name) -> bool:
                    _, _, current = await replica_sets(cluster.urls, name)
                    return victim.name in current and len(current) == 3

                await eventually(caught_up, 20, what=f"{victim.name} current on {name}")
            # And serves: a client that knows only it chats with the node on another member.
            alone = await BusClient.connect(victim.url, name="rejoined")
            try:
                await eventually(lambda: "echo-c" in alone.models(), 15)
                prompt, _, events = await asyncio.wait_for(chat(alone, "echo-c", 5, "back"), 20)
                assert isinstance(events[-1], Done)
                assert "".join(e.text for e in events if isinstance(e, Chunk)) == prompt
            finally:
                await alone.close()
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker_task, 10)
        await client.close()
        await jobs_nc.close()
        await worker_nc.close()


async def test_a_laptop_joins_through_a_leafnode(hub: LocalCluster) -> None:
    """A node on the laptop serves the hub and the hub's node serves the laptop; the laptop's parts
    use the hub's JetStream (token streams, node bucket, jobs) through the leafnode's mapping."""
    await hub.wait_ready()
    laptop: ServerProcess = hub.add_leaf("laptop")
    await laptop.wait_jetstream()
    hub_url = hub.servers[0].url
    on_hub = await BusClient.connect(hub_url, name="hub-client")
    on_laptop = await BusClient.connect(laptop.url, name="laptop-client")
    worker_nc = await connect(laptop.url, name="laptop-worker")
    worker = JobWorker(worker_nc, "eval", echo_job)
    worker_task = asyncio.create_task(worker.run())
    try:
        assert cluster_size(on_laptop.nc) == 1
        async with (
            echo_node(laptop.url, EchoEngine("echo-laptop")),
            echo_node(hub_url, EchoEngine("echo-hub")),
        ):
            both = {"echo-laptop", "echo-hub"}  # each side sees both nodes, in the one node bucket
            await eventually(lambda: both <= set(on_hub.models()) and both <= set(on_laptop.models()), 10)
            for client, model in ((on_hub, "echo-laptop"), (on_laptop, "echo-hub")):
                prompt, _, events = await asyncio.wait_for(chat(client, model, 8, model), 20)
                assert isinstance(events[-1], Done), events[-1]
                assert "".join(e.text for e in events if isinstance(e, Chunk)) == prompt
            # A job submitted on the hub runs on the laptop's worker.
            jobs = await on_hub.jobs()
            job_id = await jobs.submit("eval", EchoJob(payload="to the laptop", steps=3))
            job_events = await asyncio.wait_for(all_events(jobs, job_id), 20)
            assert job_events[-1].state == "done" and job_events[-1].result == {"payload": "to the laptop"}
    finally:
        worker.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker_task, 10)
        await on_hub.close()
        await on_laptop.close()
        await worker_nc.close()
