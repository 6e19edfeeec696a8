"""Failover by asking the node: a quiet stream probes its node, so a killed node is left within a
round trip and a stopped one within the probe timeout, while a node that is merely busy is never
left. Real nodes serving the default model on a real nats-server; times printed, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator

import pytest
from procs import eventually, node_argv, spawn, stop

from bus import BusClient, ChatMessage, Chunk, Done, SamplingParams
from bus.stream import ChatStream

MODEL = "SmolLM2-135M-Instruct"
STORY = "Write a long story about a dragon who learns to bake bread."


def measured(what: str, seconds: float) -> None:
    print(f"\n[failover] {what}: {seconds:.2f} s")


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def wait_nodes(client: BusClient, n: int, proc: subprocess.Popen[bytes]) -> None:
    def up() -> bool:
        entry = client.models().get(MODEL)
        return bool(entry and len(entry.nodes) >= n)

    await eventually(up, 240, proc=proc, what=f"{n} node(s)")


@pytest.fixture(scope="module")
async def first(nats_url: str, client: BusClient, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    logs = tmp_path_factory.mktemp("failover")
    proc = spawn(node_argv(nats_url, extra=["--node-id", "fo-a"]), logs / "fo-a.log")
    try:
        await wait_nodes(client, 1, proc)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
        stop(proc)


@pytest.fixture(scope="module")
async def second(first, nats_url: str, client: BusClient, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    logs = tmp_path_factory.mktemp("failover-b")
    proc = spawn(node_argv(nats_url, extra=["--node-id", "fo-b"]), logs / "fo-b.log")
    try:
        await wait_nodes(client, 2, proc)
        yield proc
    finally:
        stop(proc)


async def test_sixteen_streams_on_one_busy_node_never_fail_over(first, nats_url: str) -> None:  # type: ignore[no-untyped-def]
    """A node decoding 16 answers on 2 shared cores is slow between tokens: its streams go quiet,
    ask it, hear that it is working, and wait. A false verdict would end them: no other node."""
    client = await BusClient.connect(nats_url, name="busy-client", stall_check_s=0.1)
    try:
        params = SamplingParams(temperature=0, max_tokens=24)
        streams = [client.chat(MODEL, ask(f"{STORY} Chapter {i}."), params) for i in range(16)]

        async def run(stream: ChatStream) -> list[object]:
            return [e async for e in stream]

        results = await asyncio.gather(*(run(s) for s in streams))
        for stream, events in zip(streams, results, strict=True):
            assert isinstance(events[-1], Done), events[-1]
            assert stream.nodes_used == ["fo-a"], stream.nodes_used
        probes = sum(s.probes for s in streams)
        print(f"\n[failover] 16 streams on one node: {probes} probes answered 'working', 0 failovers")
        assert probes > 0  # the streams did go quiet and ask: the verdict was put to the test
    finally:
        await client.close()


async def started_on(client: BusClient, node_id: str) -> ChatStream:
    for _ in range(40):
        stream = client.chat(MODEL, ask(STORY), SamplingParams(temperature=0, max_tokens=60))
        await stream.start()
        if stream.node_id == node_id:
            return stream
        await stream.aclose()
    raise AssertionError(f"no answer landed on {node_id}")


async def after_signal(stream: ChatStream, proc: subprocess.Popen[bytes], sig: int) -> AsyncIterator[float]:
    """Read a few chunks, signal the node, yield the seconds to the next chunk, drain the rest."""
    seen = 0
    async for event in stream:
        if isinstance(event, Chunk):
            seen += 1
            if seen == 3:
                os.killpg(proc.pid, sig)
                signalled = time.monotonic()
            elif seen == 4:
                yield time.monotonic() - signalled
        if isinstance(event, Done):
            return
    raise AssertionError(f"the stream ended without Done: {stream.result}")


async def test_sigstop_then_sigkill_fail_over_to_the_other_node(first, second, client: BusClient) -> None:  # type: ignore[no-untyped-def]
    for proc, node_id, sig in ((first, "fo-a", signal.SIGSTOP), (first, "fo-a", signal.SIGKILL)):
        stream = await started_on(client, node_id)
        async for seconds in after_signal(stream, proc, sig):
            measured(f"{signal.Signals(sig).name} mid-stream -> next token from the other node", seconds)
        assert stream.nodes_used == ["fo-a", "fo-b"], stream.nodes_used
        assert isinstance(stream.result, Done) and stream.result.finish_reason in ("stop", "length")
        if sig == signal.SIGSTOP:
            os.killpg(proc.pid, signal.SIGCONT)
            await asyncio.sleep(1.0)  # its heartbeat lists it again
