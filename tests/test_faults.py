"""Faults caused for real: the NATS server restarts, a node hangs (SIGSTOP), a client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from fakes import EchoEngine, user
from procs import eventually

from bus import BusClient, Chunk, Done, Failed
from bus.connection import connect
from bus.server import EmbeddedServer
from node.service import NodeService


def measured(what: str, seconds: float) -> None:
    print(f"\n[recovery] {what}: {seconds:.1f} s")  # for docs/reliability.md; never asserted


@pytest.fixture
def own_server(tmp_path):  # type: ignore[no-untyped-def]
    server = EmbeddedServer(data_dir=tmp_path / "js", port=0, log_file=tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


async def test_everything_reconnects_after_server_restart(own_server: EmbeddedServer) -> None:
    nc = await connect(own_server.url, name="node")
    service = NodeService(nc, EchoEngine("echo-r", step_s=0.01), max_queued=0)
    await service.start()
    client = await BusClient.connect(own_server.url, name="c")
    try:
        await eventually(lambda: "echo-r" in client.models(), 15)
        own_server.kill()
        own_server.start()  # same port, same data dir
        back = time.monotonic()
        await eventually(lambda: nc.is_connected and client.nc.is_connected, 20)
        events: list[object] = []
        error: Exception | None = None
        for _ in range(100):  # the first tries may race the node's re-registration
            try:
                events = [e async for e in client.chat("echo-r", user("still here after restart"))]
                break
            except Exception as e:
                error = e
                await asyncio.sleep(0.2)
        assert events, f"no answer in 100 tries after the restart; last error: {error!r}"
        assert isinstance(events[-1], Done)
        assert "".join(e.text for e in events if isinstance(e, Chunk)) == "still here after restart"
        measured("NATS server restarted -> a whole answer again", time.monotonic() - back)
    finally:
        await client.close()
        await service.drain(1)
        await nc.close()


async def test_client_that_vanishes_stops_generation(own_server: EmbeddedServer) -> None:
    """No keep-alives (a dead gateway): the node cancels the request by itself."""
    nc = await connect(own_server.url, name="node")
    engine = EchoEngine("echo-k", step_s=0.05)
    service = NodeService(nc, engine, max_queued=0)
    await service.start()
    client = await BusClient.connect(own_server.url, name="doomed", keepalive_every_s=1000)
    try:
        await eventually(lambda: "echo-k" in client.models(), 15)
        from bus.schemas import GenerateRequest

        stream = client._stream(
            GenerateRequest(request_id="lost-1", model="echo-k", messages=user("w " * 500), keepalive_s=1.0)
        )
        await stream.start()
        await anext(stream)
        await client.nc.close()  # the client process is gone: no cancel, no keep-alive
        gone = time.monotonic()
        await eventually(lambda: not service._jobs, 10)
        measured("client gone (keep-alive timeout 1 s) -> node stops", time.monotonic() - gone)
        await eventually(lambda: "lost-1" not in engine.running_ids, 5)
    finally:
        with contextlib.suppress(Exception):
            await client.close()
        await service.drain(1)
        await nc.close()


async def test_lost_node_without_failover_fails_clearly(own_server: EmbeddedServer) -> None:
    nc = await connect(own_server.url, name="node")
    service = NodeService(nc, EchoEngine("echo-l", step_s=0.05), max_queued=0)
    await service.start()
    client = await BusClient.connect(own_server.url, name="c", stall_check_s=0.5)
    try:
        await eventually(lambda: "echo-l" in client.models(), 15)
        stream = client.chat("echo-l", user("w " * 200))
        await anext(stream)
        # The node freezes: its connection stays open but nothing more comes (as under SIGSTOP).
        service.engine.stop()
        for task in service._tasks:
            task.cancel()
        frozen = time.monotonic()
        events = [e async for e in stream]
        measured("node frozen, no other node -> Failed(node_lost)", time.monotonic() - frozen)
        assert isinstance(events[-1], Failed) and events[-1].code == "node_lost"
    finally:
        await client.close()
        await nc.close()


async def test_an_answer_resumes_in_another_client(own_server: EmbeddedServer) -> None:
    """A client dies mid-answer; another one, given its request and attempts, replays what was said
    and continues: live when the node is still generating, by continuation once the node cancelled."""
    nc = await connect(own_server.url, name="node")
    service = NodeService(nc, EchoEngine("echo-s", step_s=0.05), max_queued=0)
    await service.start()
    heir = await BusClient.connect(own_server.url, name="heir")
    words = [f"w{i}" for i in range(40)]
    try:
        for wait_for_the_cancel in (False, True):
            # keep-alive timeout: what the heir's keep-alives satisfy / short, not to wait for it
            keepalive_s = 1.0 if wait_for_the_cancel else 15.0
            doomed = await BusClient.connect(own_server.url, name="doomed", keepalive_s=keepalive_s)
            await eventually(lambda d=doomed: "echo-s" in d.models() and "echo-s" in heir.models(), 15)
            stream = doomed.chat("echo-s", user(" ".join(words)))
            seen = [await anext(stream) for _ in range(5)]
            request, attempts = stream.request, stream.attempts
            await doomed.nc.close()  # gone: no cancel, no keep-alive
            if wait_for_the_cancel:
                await eventually(lambda: not service._jobs, 10)
            resumed = heir.resume(request, attempts, after=5)
            rest = [e async for e in resumed]
            assert isinstance(rest[-1], Done) and rest[-1].usage.completion_tokens == 40, rest[-1]
            assert "".join(e.text for e in [*seen, *rest] if isinstance(e, Chunk)) == " ".join(words)
            assert [e.seq for e in rest] == list(range(6, 6 + len(rest)))
            assert len(resumed.attempts) == 1 + wait_for_the_cancel  # a continuation only when cut short
            with contextlib.suppress(Exception):
                await doomed.close()
    finally:
        await heir.close()
        await service.drain(1)
        await nc.close()
