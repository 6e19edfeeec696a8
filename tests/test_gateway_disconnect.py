"""A client that goes away: the gateway cancels on the node, and a stream resumes with Last-Event-ID."""

from __future__ import annotations

import json

import httpx
import pytest
import test_gateway_support as support
from fakes import sse_events
from procs import eventually
from test_gateway_support import (
    KEY,
    Gateway,
    error_of,
    gateway,
    user,
    wait_models,
)

from bus import subjects
from bus.codec import decode
from bus.connection import connect
from bus.schemas import Done, StreamEvent

# this module's own bus, echo nodes and gateways (module fixtures, see test_gateway_support)
thread, engines, nodes, gw, strict = support.ECHO_BUS


# ----------------------------------------------------------------------------- cancellation


async def test_client_disconnect_cancels_on_the_node(gw: Gateway, nats_url: str, engines) -> None:
    engine = engines["slow"]
    body = {"model": "slow", "messages": user("d " * 400), "stream": True}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.aiter_lines()
            first = json.loads(await _next_data(lines))
            await _next_data(lines)
    request_id = first["id"].removeprefix("chatcmpl-")
    # the node stops decoding: it publishes Done(cancelled) long before the 400 words (20 s) are out
    nc = await connect(nats_url, name="test-observer")
    try:
        sub = await nc.jetstream().subscribe(
            subjects.token(subjects.ANONYMOUS, request_id), ordered_consumer=True
        )

        async def cancelled() -> bool:
            while True:
                try:
                    event = decode((await sub.next_msg(timeout=1)).data, StreamEvent)
                except Exception:
                    return False
                if isinstance(event, Done):
                    return event.finish_reason == "cancelled"

        await eventually(cancelled, timeout=30)
    finally:
        await nc.close()
    await eventually(lambda: request_id not in engine.running_ids, timeout=20)


async def test_disconnect_of_a_whole_answer_cancels_too(gw: Gateway, engines) -> None:
    engine = engines["slow"]
    body = {"model": "slow", "messages": user("e " * 400)}
    async with httpx.AsyncClient(base_url=gw.url, timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=body)
    await eventually(lambda: not engine.running_ids, timeout=20)


# ----------------------------------------------------------------------------- resume (Last-Event-ID)


@pytest.fixture(scope="module")
def gw2(thread, nats_url, nodes):
    """A second gateway on the same bus: a stream started on `gw` resumes here too."""
    with gateway(thread, nats_url) as g:
        wait_models(g, {"echo", "slow"})
        yield g


async def _next_data(lines) -> str:  # type: ignore[no-untyped-def]
    async for line in lines:
        if line.startswith("data: "):
            return line[len("data: ") :]
    raise AssertionError("the stream ended")


def _content(chunk: dict, index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for c in chunk["choices"] if c["index"] == index)


async def _resume(http: httpx.AsyncClient, path: str, last_id: str | None) -> list[tuple[str | None, str]]:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    async with http.stream("GET", path, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        return [e async for e in sse_events(r)]


async def test_resume_after_a_disconnect_gets_the_rest(gw: Gateway, engines) -> None:
    words = [f"r{i}" for i in range(30)]
    body = {"model": "slow", "messages": user(" ".join(words)), "stream": True}
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        got, ids = [], []
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for ident, data in sse_events(r):
                ids.append(ident)
                got.append(_content(json.loads(data)))
                if len(got) == 6:  # the role chunk and five words, then the client is gone
                    break
        completion_id, _, seq = ids[-1].partition(":")
        assert [int(i.partition(":")[2]) for i in ids] == list(range(6))
        # the gateway cancelled it on the node at once (no one is listening)
        await eventually(lambda: not engines["slow"].running_ids, timeout=10)
        rest = await _resume(http, f"/v1/chat/completions/{completion_id}/stream", ids[-1])
    assert rest[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in rest[:-1]]
    assert {c["id"] for c in chunks} == {completion_id}
    assert "".join(got) + "".join(_content(c) for c in chunks) == " ".join(words)  # one whole answer
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    seqs = [int(i.partition(":")[2]) for i, _ in rest[:-1]]
    assert seqs == sorted(set(seqs)) and seqs[0] > int(seq)


async def test_resume_on_another_gateway_with_n_choices_and_usage(gw: Gateway, gw2: Gateway) -> None:
    words = [f"m{i}" for i in range(20)]
    body = {
        "model": "slow",
        "messages": user(" ".join(words)),
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts = ["", ""]
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
            async for ident, data in sse_events(r):
                last = ident
                chunk = json.loads(data)
                for i in (0, 1):
                    texts[i] += _content(chunk, i)
                if min(len(t.split()) for t in texts) >= 3:
                    break
        completion_id = last.partition(":")[0]
        assert len(last.partition(":")[2].split(",")) == 2  # one position per choice
        rest = await _resume(http, f"{gw2.url}/v1/chat/completions/{completion_id}/stream", last)
    assert rest[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in rest[:-1]]
    for i in (0, 1):
        texts[i] += "".join(_content(c, i) for c in chunks)
    assert texts == [" ".join(words)] * 2
    finish = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    assert finish == ["stop", "stop"]
    assert chunks[-1]["usage"] == {"prompt_tokens": 20, "completion_tokens": 40, "total_tokens": 60}


async def test_resume_of_a_finished_stream_replays_it_exactly(gw: Gateway, gw2: Gateway) -> None:
    body = {"model": "echo", "prompt": "a b c d e f", "echo": True, "stream": True, "max_tokens": 50}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{gw.url}/v1/completions", json=body) as r:
            original = [e async for e in sse_events(r)]
        completion_id = original[0][0].partition(":")[0]
        assert completion_id.startswith("cmpl-")
        path = f"{gw2.url}/v1/completions/{completion_id}/stream"
        assert await _resume(http, path, original[3][0]) == original[4:]
        assert await _resume(http, path, None) == original  # no Last-Event-ID: from the start
        assert await _resume(http, path, original[-2][0]) == original[-1:]  # had it all but [DONE]


async def test_resume_errors_are_clear(gw: Gateway, strict: Gateway) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        body = {"model": "echo", "messages": user("x y"), "stream": True}
        async with http.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
            events = [e async for e in sse_events(r)]
        cid = events[0][0].partition(":")[0]
        ok = f"{gw.url}/v1/chat/completions/{cid}/stream"
        error_of(
            await http.get(f"{gw.url}/v1/chat/completions/chatcmpl-nope/stream"), 404, "resume_not_found"
        )
        error_of(await http.get(f"{gw.url}/v1/completions/{cid}/stream"), 404, "resume_not_found")
        for bad in ("garbage", f"{cid}:x", f"{cid}:1,2", "chatcmpl-other:1"):
            r = await http.get(ok, headers={"Last-Event-ID": bad})
            assert error_of(r, 400, "invalid_last_event_id")["param"] == "Last-Event-ID"
        r = await http.get(ok, headers={"Last-Event-ID": f"{cid}:999"})
        assert "ends at event" in error_of(r, 400)["message"]
        # with API keys, only the key that started a stream may resume it
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.stream("POST", f"{strict.url}/v1/chat/completions", json=body, headers=headers) as r:
            cid = (await anext(sse_events(r)))[0].partition(":")[0]
        path = f"{strict.url}/v1/chat/completions/{cid}/stream"
        error_of(await http.get(path, headers={"Authorization": "Bearer sk-other"}), 404, "resume_not_found")
        assert (await http.get(path, headers=headers)).status_code == 200
