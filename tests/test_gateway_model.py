"""The gateway as a process (`python -m gateway`) in front of a real node with the real default model."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import socket
import sys

import httpx
import openai
import pytest
from procs import eventually, node_process, spawn, stop, wait_until
from test_gateway_support import sse_payloads

from bus import subjects
from bus.codec import decode
from bus.connection import connect
from bus.schemas import Done, StreamEvent

pytestmark = pytest.mark.model

MODEL = "smol-gw"
KEY, ENV_KEY = "sk-flag-key", "sk-env-key"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PING_S = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and MODEL in {m["id"] for m in r.json()["data"]}


@pytest.fixture(scope="module")
def url(nats_url: str, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("gateway-model")
    port = _free_port()
    argv = ["-m", "gateway", "--nats", nats_url, "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY]
    argv += ["--sse-ping", str(PING_S)]  # every stream here crosses keep-alives, as long ones do at 15 s
    # float32: these tests compare answers across requests (streamed vs whole, SDK vs raw SSE); in bf16
    # a later request that reuses a cached prefix may break a near-tie the other way (node/hf.py).
    with node_process(nats_url, logs / "node.log", name=MODEL, extra=["--dtype", "float32"]) as node:
        gw = spawn([sys.executable, *argv], logs / "gateway.log", env={"CHATBUS_API_KEYS": ENV_KEY})
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(lambda: node.poll() is None and _ready(base), 180, gw, logs / "gateway.log")
            yield base
        finally:
            assert stop(gw) in (0, -15), (logs / "gateway.log").read_text()


def sdk(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def asdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_and_keys_from_flag_and_env(url: str) -> None:
    model = sdk(url).models.retrieve(MODEL)
    assert model.context_length == 8192 and len(model.nodes) == 1  # type: ignore[attr-defined]
    assert sdk(url, ENV_KEY).models.list().data
    with pytest.raises(openai.AuthenticationError):
        sdk(url, "nope").models.list()
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_sync_chat_whole_and_streamed(url: str) -> None:
    r = sdk(url).chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 12
    stream = sdk(url).chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        temperature=0,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_length_stop_and_seed(url: str) -> None:
    client = sdk(url)
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=12, stop=["Paris"]
    )
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    seeded = [
        client.chat.completions.create(
            model=MODEL,
            messages=FRANCE,
            temperature=1.0,
            top_p=0.9,
            seed=42,
            max_tokens=8,
            extra_body={"top_k": 40, "repetition_penalty": 1.1},
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_logprobs_chat_and_completions(url: str) -> None:
    client = sdk(url)
    r = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 for t in content)
    c = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, logprobs=1, temperature=0
    )
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0


async def test_async_sdk_concurrent_streams_and_completions(url: str) -> None:
    client = asdk(url)

    async def streamed(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    questions = ["Name a color.", "Name a fruit.", "Name an animal.", "What is 2+2?"]
    texts = await asyncio.gather(*(streamed(q) for q in questions))
    assert all(texts)
    whole = await client.completions.create(
        model=MODEL, prompt=["Once upon a time", "Hello"], max_tokens=5, echo=True
    )
    assert len(whole.choices) == 2 and whole.choices[0].text.startswith("Once upon a time")
    await client.close()


def test_embeddings_and_token_check(url: str) -> None:
    r = sdk(url).embeddings.create(model=MODEL, input=["hello world", "bonjour"])
    assert len(r.data) == 2 and r.usage.prompt_tokens > 0
    assert math.isclose(sum(x * x for x in r.data[0].embedding), 1.0, rel_tol=1e-3)
    body = {"prompts": [{"model": MODEL, "prompt": "hello world", "max_tokens": 100}]}
    check = httpx.post(f"{url}/api/v1/token_check", json=body, headers={"Authorization": f"Bearer {KEY}"})
    item = check.json()["prompts"][0]
    assert item["fits"] and item["contextLength"] == 8192 and 0 < item["tokenCount"] < 10


def test_context_length_exceeded(url: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 9000}])
    assert e.value.code == "context_length_exceeded" and "8192" in e.value.message


def test_a_2mb_prompt_is_the_contexts_400_not_a_413(url: str) -> None:
    """Over NATS' 1 MB payload the prompt goes by reference (bus/prompts.py); the node reads it,
    counts it off its event loop and says it does not fit, with both numbers; then serves on."""
    big = "The quick brown fox jumps over the lazy dog. " * 46_000  # 2.07 MB
    with pytest.raises(openai.BadRequestError) as e:
        sdk(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": big}])
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert "8192" in e.value.message and e.value.param == "messages"
    r = sdk(url).chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=8, temperature=0)
    assert "Paris" in (r.choices[0].message.content or "")


def test_raw_sse_framing(url: str) -> None:
    body = {"model": MODEL, "prompt": "One, two,", "max_tokens": 5, "stream": True, "temperature": 0}
    raw = httpx.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ).text
    payloads = sse_payloads(raw)
    assert payloads[-1] == "[DONE]"
    last = json.loads(payloads[-2])
    assert last["choices"][0]["finish_reason"] == "length" and last["object"] == "text_completion"


async def test_disconnect_stops_decoding_on_the_real_node(url: str, nats_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 2000,
        "stream": True,
    }
    async with httpx.AsyncClient(
        base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}
    ) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = (line async for line in r.aiter_lines() if line.startswith("data: "))  # not `id:`
            first = json.loads((await anext(lines))[len("data: ") :])
            for _ in range(3):
                await anext(lines)
    request_id = first["id"].removeprefix("chatcmpl-")
    nc = await connect(nats_url, name="test-observer")
    try:
        sub = await nc.jetstream().subscribe(
            subjects.token(subjects.ANONYMOUS, request_id), ordered_consumer=True
        )
        ends: list[Done] = []

        async def ended() -> bool:
            while True:
                try:
                    event = decode((await sub.next_msg(timeout=0.2)).data, StreamEvent)
                except Exception:
                    return bool(ends)
                if isinstance(event, Done):
                    ends.append(event)

        await eventually(ended, timeout=20)
        assert ends[0].finish_reason == "cancelled" and ends[0].usage.completion_tokens < 2000
    finally:
        await nc.close()


def test_long_streams_cross_keep_alives_in_every_client(url: str) -> None:
    """A stream that outlasts keep-alive intervals parses in the SDK, LangChain and raw SSE alike.

    The gateway pings every 0.2 s here (15 s by default); the SDK used to fail with JSONDecodeError at
    the first ping after an event carrying `id:`. Every client must give the non-streamed text.
    """
    from langchain_openai import ChatOpenAI

    story = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
    tokens = 80
    whole = sdk(url).chat.completions.create(model=MODEL, messages=story, temperature=0, max_tokens=tokens)
    text = whole.choices[0].message.content
    assert whole.usage.completion_tokens == tokens and text

    body = {"model": MODEL, "messages": story, "temperature": 0, "max_tokens": tokens, "stream": True}
    raw = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    ).text
    after_ids = raw[raw.index("\nid: ") :]
    assert after_ids.count("\n:") >= 2, "the stream must cross keep-alives to test anything"
    chunks = [json.loads(p) for p in sse_payloads(raw)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text

    stream = sdk(url).chat.completions.create(
        model=MODEL, messages=story, temperature=0, max_tokens=tokens, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text

    llm = ChatOpenAI(
        model=MODEL, base_url=f"{url}/v1", api_key=KEY, temperature=0, max_tokens=tokens, max_retries=0
    )
    assert "".join(str(c.content) for c in llm.stream(story[0]["content"])) == text


def test_langchain_chat_openai(url: str) -> None:
    if importlib.util.find_spec("langchain_openai") is None:
        pytest.skip("langchain-openai is not installed (pip install langchain-openai)")
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=f"{url}/v1", api_key=KEY, temperature=0, max_tokens=12, max_retries=0
    )
    assert "Paris" in llm.invoke("What is the capital of France?").content
    parts = [chunk.content for chunk in llm.stream("What is the capital of France?")]
    assert len(parts) > 2 and "Paris" in "".join(parts)
