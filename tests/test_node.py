"""Issue 2 through the real default model: nodes as real processes on a real nats-server."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from procs import node_argv, spawn, stop

from bus import BusClient, ChatMessage, Chunk, Done, ModelNotFound, SamplingParams
from bus.connection import NODE_TTL_S

MODEL = "SmolLM2-135M-Instruct"
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
async def two_nodes(nats_url: str, client: BusClient, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("nodes")
    procs = [
        spawn(node_argv(nats_url, extra=["--node-id", f"t-node-{i}"]), logs / f"node{i}.log")
        for i in range(2)
    ]
    try:
        for _ in range(1200):
            entry = client.models().get(MODEL)
            if entry and len(entry.nodes) == 2:
                break
            for i, p in enumerate(procs):
                assert p.poll() is None, (logs / f"node{i}.log").read_text()
            await asyncio.sleep(0.25)
        else:
            raise AssertionError("nodes did not come up")
        yield procs
    finally:
        for p in procs:
            stop(p)


async def collect(stream) -> list:  # type: ignore[no-untyped-def]
    return [e async for e in stream]


def ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def test_greedy_answer_is_paris_and_stream_is_well_formed(two_nodes, client: BusClient) -> None:
    stream = client.chat(MODEL, ask("What is the capital of France?"), GREEDY)
    events = [e async for e in stream]
    text = "".join(e.text for e in events if isinstance(e, Chunk))
    assert "Paris" in text
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert isinstance(events[-1], Done) and events[-1].finish_reason in ("stop", "length")
    assert events[-1].usage.completion_tokens == sum(e.tokens for e in events if isinstance(e, Chunk))
    assert events[-1].usage.prompt_tokens > 5


async def test_max_tokens_and_stop_are_honoured(two_nodes, client: BusClient) -> None:
    events = [
        e
        async for e in client.chat(
            MODEL, ask("Count from 1 to 50."), SamplingParams(temperature=0, max_tokens=5)
        )
    ]
    assert events[-1].finish_reason == "length" and events[-1].usage.completion_tokens == 5
    stream = client.chat(
        MODEL, ask("What is the capital of France?"), SamplingParams(temperature=0, stop=["Paris"])
    )
    events = [e async for e in stream]
    assert "Paris" not in stream.text and events[-1].finish_reason == "stop"


async def test_cancel_stops_decoding(two_nodes, client: BusClient) -> None:
    stream = client.chat(
        MODEL, ask("Write a long story about a dragon."), SamplingParams(temperature=0, max_tokens=400)
    )
    first = await anext(stream)
    assert isinstance(first, Chunk)
    await stream.cancel()
    rest = [e async for e in stream]
    assert isinstance(rest[-1], Done) and rest[-1].finish_reason == "cancelled"
    assert rest[-1].usage.completion_tokens < 400


async def test_unknown_model_is_a_typed_error_at_once(two_nodes, client: BusClient) -> None:
    with pytest.raises(ModelNotFound, match=MODEL):  # the message lists what is served
        await asyncio.wait_for(client.chat("no-such-model", ask("hi")).start(), 2.0)


async def test_two_nodes_both_take_requests(two_nodes, client: BusClient) -> None:
    streams = [
        client.chat(MODEL, ask(f"Say the number {i}."), SamplingParams(temperature=0, max_tokens=4))
        for i in range(8)
    ]
    results = await asyncio.gather(*(collect(s) for s in streams))
    assert all(isinstance(r[-1], Done) for r in results)
    assert len({s.node_id for s in streams}) == 2


async def test_sigkilled_node_mid_stream_fails_over_and_disappears(two_nodes, client: BusClient) -> None:
    prompt = ask("List the planets of the solar system, one per line, with a sentence about each.")
    params = SamplingParams(temperature=0, max_tokens=60)
    stream = client.chat(MODEL, prompt, params)
    while True:  # get a stream on the node we are going to kill
        await stream.start()
        if stream.node_id == "t-node-1":
            break
        await stream.aclose()
        stream = client.chat(MODEL, prompt, params)
    events = [await anext(stream) for _ in range(3)]
    victim = two_nodes[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    events += [e async for e in stream]
    assert isinstance(events[-1], Done), events[-1]  # one continuous answer, not a truncated one
    assert stream.nodes_used == ["t-node-1", "t-node-0"]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].usage.completion_tokens <= 60
    for _ in range(int((NODE_TTL_S + 4) / 0.1)):
        if len(client.models()[MODEL].nodes) == 1:
            break
        await asyncio.sleep(0.1)
    assert [n.node_id for n in client.models()[MODEL].nodes] == ["t-node-0"]


def test_bad_model_path_is_one_clear_line(nats_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "node", "--model", str(tmp_path / "missing"), "--nats", nats_url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "missing" in out.stderr


def test_unreachable_nats_is_one_clear_line() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "node", "--nats", "nats://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "cannot reach NATS" in out.stderr
