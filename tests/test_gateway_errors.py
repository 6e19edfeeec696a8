"""The gateway's errors: each failure gets the right status and OpenAI error, and serving goes on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import test_gateway_support as support
from procs import eventually
from test_gateway_support import (
    KEY,
    Gateway,
    LoopThread,
    error_of,
    gateway,
    post,
    sdk,
    sse_payloads,
    user,
)

from bus import EmbeddedServer, subjects
from bus.codec import encode
from bus.connection import connect, ensure_nodes_bucket
from bus.schemas import ModelCard, NodeInfo

# this module's own bus, echo nodes and gateways (module fixtures, see test_gateway_support)
thread, engines, nodes, gw, strict = support.ECHO_BUS


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
    await nc.flush()  # the server knows the subscription before the gateway asks (else: no responders, 404)
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
