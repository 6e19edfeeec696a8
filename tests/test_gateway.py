"""The OpenAI gateway over a real nats-server and echo nodes: models, chat, completions, embeddings, auth, CORS."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import httpx
import openai
import pytest
import test_gateway_support as support
from test_gateway_support import (
    KEY,
    Gateway,
    error_of,
    post,
    sdk,
    sse_payloads,
    user,
)

# this module's own bus, echo nodes and gateways (module fixtures, see test_gateway_support)
thread, engines, nodes, gw, strict = support.ECHO_BUS


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
