"""The OpenAI gateway over a real nats-server and NodeService with scripted echo engines (fast)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import struct
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from fakes import EchoEngine, sse_events
from test_gateway_support import EchoNode, Gateway, LoopThread, eventually, gateway, sse_payloads

from bus import EmbeddedServer, subjects
from bus.codec import decode, encode
from bus.connection import connect, ensure_nodes_bucket
from bus.schemas import Done, ModelCard, NodeInfo, StreamEvent
from gateway import GatewayConfig

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def thread():
    t = LoopThread()
    yield t
    t.stop()


@pytest.fixture(scope="module")
def engines() -> dict[str, EchoEngine]:
    return {
        "echo": EchoEngine("echo", step_s=0.005, max_running=8),
        "slow": EchoEngine("slow", step_s=0.05, max_running=4),
        "tiny": EchoEngine("tiny", step_s=0.05, max_running=1),
    }


@pytest.fixture(scope="module")
def nodes(thread, nats_url, engines):
    with EchoNode(thread, nats_url, engines["echo"]), EchoNode(thread, nats_url, engines["slow"]):
        with EchoNode(thread, nats_url, engines["tiny"]):
            yield


@pytest.fixture(scope="module")
def gw(thread, nats_url, nodes):
    config = GatewayConfig(cors_origins=("http://example.com",), max_body_bytes=2 * 1024 * 1024)
    with gateway(thread, nats_url, config) as g:
        _wait_models(g, {"echo", "slow", "tiny"})
        yield g


@pytest.fixture(scope="module")
def strict(thread, nats_url, nodes):
    """API keys, a short generation deadline and a short accept timeout."""
    config = GatewayConfig(api_keys=(KEY, "sk-other"), deadline_s=0.6)
    with gateway(thread, nats_url, config, accept_timeout_s=1.0) as g:
        _wait_models(g, {"echo", "slow"}, KEY)
        yield g


def _wait_models(g: Gateway, names: set[str], key: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        data = httpx.get(f"{g.url}/v1/models", headers=headers).json()["data"]
        if names <= {m["id"] for m in data}:
            return
        time.sleep(0.1)
    raise AssertionError(f"models {names} never showed up")


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def sdk(g: Gateway, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0)


async def post(g: Gateway, path: str, body: object, key: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(base_url=g.url, timeout=30) as http:
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        return await http.post(path, content=content, headers=headers)


def error_of(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ----------------------------------------------------------------------------- models, health


def test_models_are_live_with_context_and_nodes(gw: Gateway) -> None:
    models = sdk(gw).models.list()
    echo = next(m for m in models.data if m.id == "echo")
    assert echo.context_length == 1000 and echo.can_embed  # type: ignore[attr-defined]
    assert len(echo.nodes) == 1 and echo.nodes[0]["capacity"] == 8  # type: ignore[attr-defined]
    assert sdk(gw).models.retrieve("slow").id == "slow"
    r = httpx.get(f"{gw.url}/v1/models/nope")
    assert "echo" in error_of(r, 404, "model_not_found")["message"]
    health = httpx.get(f"{gw.url}/health").json()
    assert health["status"] == "ok" and health["nodes"] >= 3 and "echo" in health["models"]


# ----------------------------------------------------------------------------- chat and completions


def test_chat_through_the_sync_sdk(gw: Gateway) -> None:
    r = sdk(gw).chat.completions.create(
        model="echo", messages=user("one two three"), temperature=0, user="u1"
    )
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 0
    assert r.system_fingerprint is None and r.model == "echo"
    assert r.choices[0].message.content == "one two three" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 3, 6)
    r = sdk(gw).chat.completions.create(model="echo", messages=user("one two three"), max_completion_tokens=2)
    assert r.choices[0].message.content == "one two" and r.choices[0].finish_reason == "length"


def test_n_choices_and_content_parts(gw: Gateway) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a b "}, {"type": "text", "text": "c"}]}
    ]
    r = sdk(gw).chat.completions.create(model="echo", messages=messages, n=3, seed=7)  # type: ignore[arg-type]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "a b c" for c in r.choices)
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 9


async def test_stream_sse_framing_role_finish_usage_done(gw: Gateway) -> None:
    body = {
        "model": "echo",
        "messages": user("alpha beta gamma"),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = await post(gw, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == "alpha beta gamma"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["choices"][0]["delta"] == {}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 6


async def test_async_sdk_streams_n_choices_concurrently(gw: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(model="slow", messages=user("a b c d"), n=3, stream=True)
    texts = ["", "", ""]
    finish = [None, None, None]
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == ["a b c d"] * 3 and finish == ["stop"] * 3
    await client.close()


async def test_several_concurrent_streams(gw: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)

    async def one(i: int) -> str:
        words = " ".join(f"w{i}-{j}" for j in range(8))
        stream = await client.chat.completions.create(model="echo", messages=user(words), stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(6)))
    assert texts == [" ".join(f"w{i}-{j}" for j in range(8)) for i in range(6)]
    await client.close()


async def test_completions_list_prompts_echo_stop(gw: Gateway) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    r = await client.completions.create(model="echo", prompt=["a b c", "x y"], n=2, echo=True, max_tokens=5)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert [c.text for c in r.choices] == ["a b ca b c", "a b ca b c", "x yx y", "x yx y"]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 10
    r = await client.completions.create(model="echo", prompt="p q r s", stop=" r", max_tokens=2)
    assert r.choices[0].text == "p q" and r.choices[0].finish_reason == "length"
    stream = await client.completions.create(model="echo", prompt="k l", stream=True, echo=True)
    assert "".join([c.choices[0].text async for c in stream]) == "k lk l"
    await client.close()


# ----------------------------------------------------------------------------- embeddings, token count


def test_embeddings_float_and_base64(gw: Gateway) -> None:
    r = sdk(gw).embeddings.create(model="echo", input=["a b", "c"], encoding_format="float")
    assert [d.embedding for d in r.data] == [[1.0, 0.0], [1.0, 0.0]] and r.usage.prompt_tokens == 3
    raw = httpx.post(
        f"{gw.url}/v1/embeddings", json={"model": "echo", "input": "a", "encoding_format": "base64"}
    ).json()
    assert struct.unpack("<2f", base64.b64decode(raw["data"][0]["embedding"])) == (1.0, 0.0)
    r2 = sdk(gw).embeddings.create(model="echo", input="hello")  # the SDK asks for base64 and decodes it
    assert r2.data[0].embedding == [1.0, 0.0]
    err = error_of(httpx.post(f"{gw.url}/v1/embeddings", json={"model": "echo", "input": [1, 2]}), 400)
    assert err["param"] == "input"


async def test_token_check(gw: Gateway) -> None:
    body = {
        "prompts": [
            {"model": "echo", "prompt": "a b c", "max_tokens": 10},
            {"model": "echo", "messages": user("a b"), "max_tokens": 999},
        ]
    }
    r = await post(gw, "/api/v1/token_check", body)
    assert r.json() == {
        "prompts": [
            {"fits": True, "tokenCount": 3, "contextLength": 1000},
            {"fits": False, "tokenCount": 2, "contextLength": 1000},
        ]
    }


# ----------------------------------------------------------------------------- errors


async def test_bad_requests_are_400_with_the_param(gw: Gateway) -> None:
    chat = "/v1/chat/completions"
    assert error_of(await post(gw, chat, b"{not json"), 400, "invalid_json")
    base = {"model": "echo", "messages": user("hi")}
    assert error_of(await post(gw, chat, {**base, "foo": 1}), 400, "unknown_parameter")["param"] == "foo"
    assert error_of(await post(gw, chat, {**base, "temperature": 5}), 400)["param"] == "temperature"
    assert error_of(await post(gw, chat, {**base, "temperature": "hot"}), 400)["param"] == "temperature"
    assert (
        error_of(await post(gw, chat, {**base, "tools": [{"type": "function"}]}), 400)["param"] == "tools[0]"
    )
    fmt = {**base, "response_format": {"type": "yaml"}}
    assert error_of(await post(gw, chat, fmt), 400, "invalid_value")["param"] == "response_format"
    assert error_of(await post(gw, chat, {**base, "logit_bias": {"x": 2}}), 400)["param"] == "logit_bias"
    assert error_of(await post(gw, chat, {**base, "functions": [{"name": "f"}]}), 400)["param"] == "functions"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert error_of(await post(gw, chat, {"model": "echo", "messages": image}), 400)
    assert error_of(await post(gw, chat, {**base, "n": 99}), 400)["param"] == "n"
    assert error_of(await post(gw, chat, {**base, "stream_options": {"include_usage": True}}), 400)
    assert error_of(await post(gw, chat, {"model": "echo", "messages": []}), 400)
    echo_lp = {"model": "echo", "prompt": "a", "echo": True, "logprobs": 1}
    assert error_of(await post(gw, "/v1/completions", echo_lp), 400, "unsupported_parameter")
    assert error_of(await post(gw, "/v1/completions", {"model": "echo", "prompt": [1, 2]}), 400)


async def test_unknown_model_404_lists_served_and_route_404(gw: Gateway) -> None:
    err = error_of(await post(gw, "/v1/chat/completions", {"model": "nope", "messages": user("x")}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model" and "echo" in err["message"]
    async with httpx.AsyncClient(base_url=gw.url) as http:
        error_of(await http.get("/v1/nothing"), 404, "not_found")
        error_of(await http.get("/v1/chat/completions"), 405)


async def test_too_large_is_413_and_over_one_message_is_the_contexts_call(gw: Gateway) -> None:
    huge = {"model": "echo", "messages": user("x " * (1536 * 1024))}  # 3 MiB > the 2 MiB body limit
    assert (
        "limit" in error_of(await post(gw, "/v1/chat/completions", huge), 413, "request_too_large")["message"]
    )
    # Under the body limit, over NATS' 1 MB payload: it goes by reference, and the model's context decides.
    big = {"model": "echo", "prompt": "xy " * (400 * 1024)}
    err = error_of(await post(gw, "/v1/completions", big), 400, "context_length_exceeded")
    assert str(400 * 1024) in err["message"] and err["param"] == "prompt"


async def test_context_length_exceeded_says_the_numbers(gw: Gateway) -> None:
    body = {"model": "echo", "messages": user("w " * 1001)}
    err = error_of(await post(gw, "/v1/chat/completions", body), 400, "context_length_exceeded")
    assert "1001" in err["message"] and "1000" in err["message"] and err["param"] == "messages"


async def test_busy_is_429_with_retry_after(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        body = {"model": "tiny", "messages": user("z " * 100), "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as running:
            assert running.status_code == 200
            r = await http.post("/v1/chat/completions", json={"model": "tiny", "messages": user("q")})
            error_of(r, 429, "rate_limit_exceeded")
            assert int(r.headers["retry-after"]) >= 1


async def test_known_model_without_a_live_node_is_503(gw: Gateway, nats_url: str) -> None:
    nc = await connect(nats_url, name="ghost-writer")
    kv = await ensure_nodes_bucket(nc.jetstream())
    ghost = NodeInfo(
        node_id="ghost-1",
        host="nowhere",
        pid=1,
        models=[ModelCard(name="ghost", context_length=10)],
        device="cpu",
        dtype="none",
        capacity=1,
        updated_at=time.time(),
    )
    await kv.put("ghost-1", encode(ghost))
    try:
        async with httpx.AsyncClient(base_url=gw.url) as http:
            await eventually(lambda: _has_model(http, "ghost"))
            r = await http.post("/v1/chat/completions", json={"model": "ghost", "messages": user("x")})
        error_of(r, 503, "no_node_available")
    finally:
        await kv.delete("ghost-1")
        await nc.close()


async def _has_model(http: httpx.AsyncClient, name: str) -> bool:
    return name in {m["id"] for m in (await http.get("/v1/models")).json()["data"]}


async def test_silent_node_is_504(strict: Gateway, nats_url: str) -> None:
    nc = await connect(nats_url, name="mute-node")

    async def ignore(msg: object) -> None:
        pass

    await nc.subscribe(subjects.gen("mute"), queue=subjects.NODE_QUEUE, cb=ignore)
    try:
        body = {"model": "mute", "messages": user("x")}
        r = await post(strict, "/v1/chat/completions", body, KEY)
        error_of(r, 504, "timeout")
    finally:
        await nc.close()


def test_error_after_streaming_began_is_an_error_event(strict: Gateway) -> None:
    stream = sdk(strict, KEY).chat.completions.create(model="slow", messages=user("z " * 200), stream=True)
    got = []
    with pytest.raises(openai.APIError, match="deadline"):
        for chunk in stream:
            got.append(chunk)
    assert got and got[0].choices[0].delta.role == "assistant"
    raw = httpx.post(
        f"{strict.url}/v1/chat/completions",
        json={"model": "slow", "messages": user("z " * 200), "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ).text
    last = json.loads(sse_payloads(raw)[-1])
    assert last["error"]["code"] == "timeout" and "[DONE]" not in raw


# ----------------------------------------------------------------------------- auth, CORS


def test_api_keys(strict: Gateway) -> None:
    url = f"{strict.url}/v1/models"
    assert "missing" in error_of(httpx.get(url), 401, "invalid_api_key")["message"]
    assert "invalid" in error_of(httpx.get(url, headers={"Authorization": "Bearer no"}), 401)["message"]
    assert httpx.get(url, headers={"Authorization": "Bearer sk-other"}).status_code == 200
    assert httpx.get(f"{strict.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        sdk(strict, "wrong").models.list()
    r = sdk(strict, KEY).chat.completions.create(model="echo", messages=user("ok"))
    assert r.choices[0].message.content == "ok"
    check = httpx.post(f"{strict.url}/api/v1/token_check", json={"prompts": []})
    error_of(check, 401)


def test_cors(gw: Gateway) -> None:
    pre = httpx.options(
        f"{gw.url}/v1/chat/completions",
        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"},
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://example.com"
    other = httpx.get(f"{gw.url}/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


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


# ----------------------------------------------------------------------------- bus down


async def test_bus_down_is_503(thread: LoopThread, tmp_path) -> None:
    server = EmbeddedServer(data_dir=tmp_path / "js", port=0, log_file=tmp_path / "nats.log")
    server.start()
    try:
        with gateway(thread, server.url) as g:
            server.stop()
            async with httpx.AsyncClient(base_url=g.url) as http:
                await eventually(lambda: _status(http, "/health", 503))
                r = await http.post("/v1/chat/completions", json={"model": "echo", "messages": user("x")})
                error_of(r, 503, "bus_unavailable")
    finally:
        server.stop()


async def _status(http: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await http.get(path)).status_code == status


# ----------------------------------------------------------------------------- resume (Last-Event-ID)


@pytest.fixture(scope="module")
def gw2(thread, nats_url, nodes):
    """A second gateway on the same bus: a stream started on `gw` resumes here too."""
    with gateway(thread, nats_url) as g:
        _wait_models(g, {"echo", "slow"})
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


# ----------------------------------------------------------------------------- bad input, one case each

_HI = user("hi")
_DEEP = "[" * 100_000 + "]" * 100_000
_NESTED_PART = {"type": "text", "text": "a", "image_url": json.loads("[" * 200 + "]" * 200)}
BAD_INPUT: dict[str, tuple[object, int, str | None, str | None]] = {
    "wrong type of model": ({"model": 5, "messages": _HI}, 400, "invalid_type", "model"),
    "wrong type of messages": ({"model": "echo", "messages": "hi"}, 400, "invalid_type", "messages"),
    "wrong type of content": (
        {"model": "echo", "messages": [{"role": "user", "content": 7}]},
        400,
        "invalid_type",
        "messages[0].content",
    ),
    "huge max_tokens": (
        {"model": "echo", "messages": _HI, "max_tokens": 10**30},
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    "huge seed": ({"model": "echo", "messages": _HI, "seed": 2**70}, 400, "invalid_value", "seed"),
    "huge n": ({"model": "echo", "messages": _HI, "n": 2**63}, 400, None, "n"),
    "huge float": (
        b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
        400,
        "invalid_type",
        "temperature",
    ),
    "negative max_tokens": (
        {"model": "echo", "messages": _HI, "max_tokens": -5},
        400,
        "invalid_value",
        "max_tokens",
    ),
    "unknown role": (
        {"model": "echo", "messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "unsupported_parameter",
        "messages[0].role",
    ),
    "invalid UTF-8": (
        b'{"model": "echo", "messages": [{"role": "user", "content": "h\xff\xfei"}]}',
        400,
        "invalid_json",
        None,
    ),
    "thousands of stop strings": (
        {"model": "echo", "messages": _HI, "stop": [f"s{i}" for i in range(5000)]},
        400,
        "invalid_value",
        "stop",
    ),
    "deeply nested JSON": (
        f'{{"model": "echo", "messages": [{{"role": "user", "content": [{{"type": "text", "image_url": {_DEEP}}}]}}]}}'.encode(),
        400,
        "invalid_json",
        None,
    ),
    "nested content parts": (
        {"model": "echo", "messages": [{"role": "user", "content": [_NESTED_PART]}]},
        400,
        "unsupported_parameter",
        "messages[0].content[0]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
async def test_bad_input_is_a_clear_error_and_serving_goes_on(gw: Gateway, case: str) -> None:
    body, status, code, param = BAD_INPUT[case]
    err = error_of(await post(gw, "/v1/chat/completions", body), status, code)
    assert err["param"] == param, err
    r = await post(gw, "/v1/chat/completions", {"model": "echo", "messages": user("still serving")})
    assert r.json()["choices"][0]["message"]["content"] == "still serving"


async def _raw_post(port: int, headers: str, chunks: Iterator[bytes]) -> tuple[int, dict]:
    """POST through a bare socket, sending `chunks` until the server answers; (status, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()

    sender = asyncio.create_task(send())
    try:
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        body = await asyncio.wait_for(reader.readexactly(length), 30)
        return int(head.split()[1]), json.loads(body)
    finally:
        sender.cancel()
        writer.close()


async def test_a_100_mb_body_is_413_and_serving_goes_on(gw: Gateway) -> None:
    size = 100 * 1024 * 1024
    megabytes = (b"x" * (1024 * 1024) for _ in range(100))
    declared = f"Content-Type: application/json\r\nContent-Length: {size}\r\n"
    status, body = await _raw_post(gw.port, declared, megabytes)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # no Content-Length: the gateway stops reading at its limit
    framed = (b"100000\r\n" + b"x" * 0x100000 + b"\r\n" for _ in range(100))
    status, body = await _raw_post(gw.port, "Transfer-Encoding: chunked\r\n", framed)
    assert status == 413 and "limit" in body["error"]["message"]
    r = await post(gw, "/v1/chat/completions", {"model": "echo", "messages": user("still serving")})
    assert r.json()["choices"][0]["message"]["content"] == "still serving"
