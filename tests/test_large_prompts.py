"""Prompts over NATS' 1 MB payload travel by reference (bus/prompts.py): through the gateway and the
official openai client the limit is the model's context, never the size of a bus message."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fakes import EchoEngine
from procs import eventually
from test_gateway_support import EchoNode, gateway, thread

from bus import BusClient, prompts, subjects
from bus.errors import BadRequest
from bus.schemas import ChatMessage, GenerateRequest, SamplingParams
from gateway import GatewayConfig

__all__ = ["thread"]  # a fixture, imported so that pytest finds it here

WORDS = 300_000  # "w0 w1 … w299999": 2.1 MB of text, 300,000 echo tokens
BIG = " ".join(f"w{i}" for i in range(WORDS))
GREEDY = SamplingParams(temperature=0, max_tokens=3)


@pytest.fixture(scope="module")
def engines() -> dict[str, EchoEngine]:
    return {
        "long": EchoEngine("long", step_s=0.02, context=10 * WORDS),  # a model of a 3M-token context
        "short": EchoEngine("short", step_s=0.005),  # 1000 tokens
    }


@pytest.fixture(scope="module")
def gw(thread, nats_url, engines):
    with EchoNode(thread, nats_url, engines["long"]), EchoNode(thread, nats_url, engines["short"]):
        with gateway(thread, nats_url, GatewayConfig()) as g:  # bodies up to 8 MiB
            thread.call(eventually(lambda: {"long", "short"} <= set(g.client.table.models())))
            yield g


def sdk(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0, timeout=120)


def test_a_2mb_chat_prompt_within_the_context_is_answered(gw, engines) -> None:
    assert len(BIG.encode()) > 2 * gw.client.max_payload == 2 * 1024 * 1024
    r = sdk(gw).chat.completions.create(
        model="long", messages=[{"role": "user", "content": BIG}], max_tokens=3, temperature=0
    )
    assert r.choices[0].message.content == "w0 w1 w2"
    assert r.usage is not None and r.usage.prompt_tokens == WORDS
    assert engines["long"].submitted[-1].messages[-1].content == BIG  # every byte reached the node


def test_a_2mb_completion_streams_and_a_2mb_chat_resumes(gw, engines) -> None:
    prompt = BIG + " tail"
    chunks = sdk(gw).completions.create(model="long", prompt=prompt, max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "w0 w1 w2 w3"
    assert engines["long"].submitted[-1].prompt == prompt
    # The gateway's resume record holds the reference, not 2 MB: a hang-up resumes to the whole answer.
    messages = [{"role": "system", "content": BIG}, {"role": "user", "content": "a b c d e f g h"}]
    body = {"model": "long", "messages": messages, "temperature": 0, "stream": True}
    with httpx.Client(base_url=gw.url, timeout=60) as http:
        text, last = [], ""
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for ident, data in _lines(r):
                text.append(_text(data))
                last = ident or last
                if len(text) == 3:
                    break  # hang up mid-answer
        cid = last.partition(":")[0]
        with http.stream("GET", f"/v1/chat/completions/{cid}/stream", headers={"Last-Event-ID": last}) as r:
            assert r.status_code == 200
            text += [_text(data) for _, data in _lines(r) if data != "[DONE]"]
    assert "".join(text) == "a b c d e f g h"
    assert engines["long"].submitted[-1].continuation  # the rest was continued on a node, by reference
    assert engines["long"].submitted[-1].messages[0].content == BIG


def _lines(r: httpx.Response):
    ident = None
    for line in r.iter_lines():
        if line.startswith("id:"):
            ident = line[3:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            yield ident, data
            if data == "[DONE]":
                return


def _text(data: str) -> str:
    choices = json.loads(data).get("choices", [])
    return "".join(c.get("text") or (c.get("delta") or {}).get("content") or "" for c in choices)


def test_a_2mb_prompt_over_the_context_is_a_clear_400_not_413(gw) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk(gw).chat.completions.create(model="short", messages=[{"role": "user", "content": BIG}])
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert str(WORDS) in e.value.message and "1000" in e.value.message
    r = sdk(gw).chat.completions.create(model="short", messages=[{"role": "user", "content": "still here"}])
    assert r.choices[0].message.content == "still here"


async def test_the_stored_prompt_is_readable_only_with_its_reference(nats_url: str) -> None:
    client = await BusClient.connect(nats_url, name="test-large-prompts")
    try:
        secret = "the launch code is 0000 " + BIG
        request = GenerateRequest(
            request_id="big-1",
            model="long",
            owner="someone",
            messages=[ChatMessage(role="user", content=secret)],
        )
        assert not prompts.fits(request, client.max_payload)
        ref = await prompts.store(client.js, request, client.max_payload)
        small = prompts.by_reference(request, ref)
        assert prompts.fits(small, client.max_payload) and small.messages is None and ref.chunks >= 3
        # What anyone reading the stream by subject (a wildcard included) gets: not the prompt.
        raw = await client.js.get_msg(subjects.PROMPTS_STREAM, subject="cb.prompt.someone.*.0", direct=True)
        assert raw.data and b"launch code" not in raw.data and b"w1 w2" not in raw.data
        back = await prompts.fetch(client.js, small)
        assert back == request
        wrong_key = small.prompt_ref.__class__(**{**_fields(ref), "key": "00" * 32})
        with pytest.raises(BadRequest, match="not the one it refers to"):
            await prompts.fetch(client.js, prompts.by_reference(request, wrong_key))
        gone = small.prompt_ref.__class__(**{**_fields(ref), "name": "f" * 32})
        with pytest.raises(BadRequest, match="not on the bus"):
            await prompts.fetch(client.js, prompts.by_reference(request, gone))
    finally:
        await client.close()


def _fields(ref: object) -> dict[str, object]:
    return {f: getattr(ref, f) for f in ref.__struct_fields__}  # type: ignore[attr-defined]


async def test_busclient_sends_a_large_prompt_by_reference(gw, engines) -> None:
    client = await BusClient.connect(gw.nats_url, name="test-large-client")
    try:
        await eventually(lambda: "long" in client.table.models())
        stream = client.chat("long", [ChatMessage(role="user", content=BIG)], GREEDY)
        text = "".join([getattr(e, "text", "") async for e in stream])
        assert text == "w0 w1 w2"
        assert stream.request.prompt_ref is not None and stream.request.messages is None
        assert engines["long"].submitted[-1].messages[-1].content == BIG
    finally:
        await client.close()
