"""The bus contract end to end with a real nats-server and a scripted engine."""

from __future__ import annotations

import asyncio

import pytest
from fakes import EchoEngine, user
from fakes import echo_node as running_node
from nats.js.api import KeyValueConfig
from procs import eventually

from bus import BusClient, Chunk, Done, Failed, ModelNotFound, SamplingParams
from bus.connection import bucket_entries, cancel_and_wait, connect
from bus.errors import BadRequest, ContextLengthExceeded, NodeBusy
from bus.publisher import RecordPublisher
from node.service import NodeService


async def collect(stream) -> list:
    return [event async for event in stream]


async def test_stream_is_gapless_and_ends_in_one_done(nats_url: str, client: BusClient) -> None:
    async with running_node(nats_url, EchoEngine("echo-a")):
        await eventually(lambda: "echo-a" in client.models())
        events = await collect(client.chat("echo-a", user("one two three four")))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert isinstance(events[-1], Done) and sum(isinstance(e, Done | Failed) for e in events) == 1
        assert "".join(e.text for e in events if isinstance(e, Chunk)) == "one two three four"
        assert events[-1].usage.completion_tokens == 4
        assert events[-1].usage.prompt_tokens == 4


async def test_unknown_model_fails_at_once(client: BusClient) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(ModelNotFound, match="nope"):
        await client.chat("nope", user("hi")).start()
    assert loop.time() - t0 < 1.0  # no-responders, not a timeout


async def test_bad_params_and_context_are_typed(nats_url: str, client: BusClient) -> None:
    async with running_node(nats_url, EchoEngine("echo-b", context=3)):
        await eventually(lambda: "echo-b" in client.models())
        with pytest.raises(BadRequest, match="top_p"):
            await client.chat("echo-b", user("x"), SamplingParams(top_p=0)).start()
        with pytest.raises(ContextLengthExceeded, match="context"):
            await client.chat("echo-b", user("a b c d e")).start()


async def test_count_and_embed_replies_and_rejections_are_typed(nats_url: str, client: BusClient) -> None:
    async with running_node(nats_url, EchoEngine("echo-k")):
        await eventually(lambda: "echo-k" in client.models())
        assert (await client.count_tokens("echo-k", prompt="a b c")).tokens == 3
        assert (await client.embed("echo-k", ["a b"])).prompt_tokens == 2
        with pytest.raises(BadRequest, match="exactly one"):
            await client.count_tokens("echo-k")
        with pytest.raises(BadRequest, match="empty"):
            await client.embed("echo-k", [])


async def test_cancel_stops_the_engine(nats_url: str, client: BusClient) -> None:
    engine = EchoEngine("echo-c", step_s=0.05)
    async with running_node(nats_url, engine):
        await eventually(lambda: "echo-c" in client.models())
        stream = client.chat("echo-c", user(" ".join(["w"] * 200)))
        first = await anext(stream)
        assert isinstance(first, Chunk)
        await stream.cancel()
        rest = await collect(stream)
        assert isinstance(rest[-1], Done) and rest[-1].finish_reason == "cancelled"
        assert len(rest) < 10
        await eventually(lambda: not engine.running_ids)


async def test_aclose_cancels_on_node(nats_url: str, client: BusClient) -> None:
    engine = EchoEngine("echo-d", step_s=0.05)
    async with running_node(nats_url, engine) as service:
        await eventually(lambda: "echo-d" in client.models())
        stream = client.chat("echo-d", user(" ".join(["w"] * 200)))
        await anext(stream)
        await stream.aclose()
        await eventually(lambda: not service._jobs)


async def test_two_nodes_share_requests(nats_url: str, client: BusClient) -> None:
    async with (
        running_node(nats_url, EchoEngine("echo-e", step_s=0.02)) as a,
        running_node(nats_url, EchoEngine("echo-e", step_s=0.02)) as b,
    ):
        await eventually(
            lambda: len(client.models().get("echo-e", None).nodes if "echo-e" in client.models() else []) == 2
        )
        streams = [client.chat("echo-e", user("a b c d e f")) for _ in range(8)]
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert all(isinstance(r[-1], Done) for r in results)
        used = [s.node_id for s in streams]
        assert used.count(a.node_id) >= 2 and used.count(b.node_id) >= 2


async def test_busy_node_rejects_and_client_says_so(nats_url: str, client: BusClient) -> None:
    async with running_node(nats_url, EchoEngine("echo-f", step_s=0.05, max_running=1)):
        await eventually(lambda: "echo-f" in client.models())
        first = client.chat("echo-f", user(" ".join(["w"] * 100)))
        await first.start()
        with pytest.raises(NodeBusy):
            await client.chat("echo-f", user("x")).start()
        await first.aclose()


async def test_failover_continues_on_another_node(nats_url: str, client: BusClient) -> None:
    words = [f"w{i}" for i in range(30)]
    async with running_node(nats_url, EchoEngine("echo-g", step_s=0.03)) as survivor:
        nc = await connect(nats_url, name="doomed")
        doomed = NodeService(nc, EchoEngine("echo-g", step_s=0.03), max_queued=0)
        await doomed.start()
        await eventually(
            lambda: len(client.models().get("echo-g").nodes) == 2 if "echo-g" in client.models() else False
        )
        # Make the doomed node the one chosen, then take it down mid-answer (drain → shutting_down).
        stream = client.chat("echo-g", user(" ".join(words)))
        while True:
            await stream.start()
            if stream.node_id == doomed.node_id:
                break
            await stream.aclose()
            stream = client.chat("echo-g", user(" ".join(words)))
        events = [await anext(stream) for _ in range(3)]
        await doomed.drain(timeout=0)
        await nc.close()
        events += await collect(stream)
        assert isinstance(events[-1], Done), events[-1]
        assert "".join(e.text for e in events if isinstance(e, Chunk)).split() == words
        assert stream.nodes_used == [doomed.node_id, survivor.node_id]
        assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def test_node_deregisters_on_drain(nats_url: str, client: BusClient) -> None:
    async with running_node(nats_url, EchoEngine("echo-h")):
        await eventually(lambda: "echo-h" in client.models())
    await eventually(lambda: "echo-h" not in client.models(), timeout=2)


async def test_full_node_rejects_and_the_client_goes_elsewhere(nats_url: str, client: BusClient) -> None:
    async with (
        running_node(nats_url, EchoEngine("echo-i", step_s=0.05, max_running=1)) as a,
        running_node(nats_url, EchoEngine("echo-i", step_s=0.05, max_running=1)) as b,
    ):
        await eventually(lambda: "echo-i" in client.models() and len(client.models()["echo-i"].nodes) == 2)
        first = client.chat("echo-i", user(" ".join(["w"] * 100)))
        await first.start()
        second = client.chat("echo-i", user(" ".join(["w"] * 100)))
        await second.start()  # whichever node the client tries first, the free one takes it
        assert {first.node_id, second.node_id} == {a.node_id, b.node_id}
        with pytest.raises(NodeBusy):  # both full now: a typed error with a retry hint
            await client.chat("echo-i", user("x")).start()
        await first.aclose()
        await second.aclose()


async def _stubborn() -> None:
    """Ends late, and with an error, when cancelled."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        await asyncio.sleep(0.2)
        raise RuntimeError("late") from None


async def _started() -> asyncio.Task[None]:
    task = asyncio.ensure_future(_stubborn())
    await asyncio.sleep(0.01)  # inside its sleep
    return task


async def test_cancel_and_wait_drops_the_tasks_end_but_not_the_callers_cancellation() -> None:
    await cancel_and_wait(await _started())  # its error is dropped

    async def caller() -> None:
        await cancel_and_wait(await _started())

    outer = asyncio.ensure_future(caller())
    await asyncio.sleep(0.05)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer


async def test_a_record_not_yet_stored_is_held_until_it_is(nats_url: str) -> None:
    """While a token stream has no leader a node's record waits in its publisher; the node's probe
    answer counts such a finished request as running (node/service.py), so a reader waits for the
    tokens instead of failing over: `holds` must be true until the message is stored."""
    nc = await connect(nats_url, name="publisher-test")
    js = nc.jetstream()
    records = RecordPublisher(js, ack_timeout_s=0.5, tick_s=0.05)
    try:
        await records.publish("cbtest.held.r1", b"token", "r1.1")  # no stream takes it yet
        await asyncio.sleep(0.3)
        assert records.holds("r1.") and not records.holds("r2.")
        await js.add_stream(name="CBTEST_HELD", subjects=["cbtest.held.>"])
        await eventually(lambda: not records.holds("r1."), 10, what="the record stored")
        assert (await js.get_last_msg("CBTEST_HELD", "cbtest.held.r1")).data == b"token"
    finally:
        await records.close()
        await nc.close()


async def test_bucket_entries_lists_every_live_key_from_the_stream_index(nats_url: str) -> None:
    """`bucket_entries` (jobs, keys, usage, triggers, node tokens) answers from the stream's subject
    index, not from nats-py's racy `kv.keys()` watcher: every live key every time, deleted ones left
    out, a prefix honoured, an empty bucket empty."""
    nc = await connect(nats_url, name="bucket-entries-test")
    js = nc.jetstream()
    try:
        kv = await js.create_key_value(KeyValueConfig(bucket="cbtest_entries", history=1))
        assert await bucket_entries(kv) == []
        names = [f"{group}.{i:03d}" for group in ("a", "b") for i in range(150)]
        for name in names:
            await kv.put(name, name.encode())
        await kv.delete("a.007")
        await kv.put("b.003", b"changed")
        for _ in range(20):  # one wrong answer in a few hundred was the bug
            entries = await bucket_entries(kv)
            assert [e.key for e in entries] == [n for n in names if n != "a.007"]
        assert {e.key: e.value for e in entries}["b.003"] == b"changed"
        assert [e.key for e in await bucket_entries(kv, "b.")] == names[150:]
        assert await bucket_entries(kv, "c.") == []
    finally:
        await nc.close()
