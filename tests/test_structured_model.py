"""Structured outputs and tools end to end: the official SDK and LangChain, a gateway process, the real model."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field
from test_gateway_model import KEY, MODEL, sdk, url  # noqa: F401  (url is the module's gateway fixture)
from test_gateway_support import sse_payloads

pytestmark = pytest.mark.model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class Address(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    address: Address


def test_parse_returns_a_nested_pydantic_object(url: str) -> None:  # noqa: F811
    r = sdk(url).chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person who lives in Paris."}],
        response_format=Person,
        temperature=0,
        max_tokens=80,
    )
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert r.choices[0].finish_reason == "stop"


# ----------------------------------------------------------------------------- 30 generated schemas


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(3, 16)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(1, 100)}
    if kind == "number":
        # multipleOf bounds the digits: without it 135M may write 10.000000... until max_tokens
        return {"type": "number", "minimum": 0, "maximum": rng.choice([1, 10, 1000]), "multipleOf": 0.01}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "cat", "dog", "yes", "no"], 3)}
    return {"type": "boolean"}


def _node(rng: random.Random, depth: int) -> dict[str, Any]:
    roll = rng.random()
    if depth < 2 and roll < 0.3:
        return _object(rng, depth + 1)
    if depth < 2 and roll < 0.5:
        return {"type": "array", "items": _node(rng, depth + 1), "minItems": 1, "maxItems": 3}
    return _leaf(rng)


def _object(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    names = rng.sample(
        ["id", "name", "size", "colour", "tags", "owner", "count", "ok", "score"], rng.randint(1, 4)
    )
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    return {
        "type": "object",
        "properties": {n: _node(rng, depth) for n in names},
        "required": required,
        "additionalProperties": False,
    }


def _valid(value: Any, schema: dict[str, Any]) -> bool:
    """A validator for exactly the keywords _object() generates."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        props = schema["properties"]
        return (
            isinstance(value, dict)
            and set(schema["required"]) <= set(value) <= set(props)
            and all(_valid(v, props[k]) for k, v in value.items())
        )
    if kind == "array":
        return (
            isinstance(value, list)
            and schema["minItems"] <= len(value) <= schema["maxItems"]
            and all(_valid(v, schema["items"]) for v in value)
        )
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema["maxLength"]
    if kind == "boolean":
        return isinstance(value, bool)
    number = int if kind == "integer" else (int, float)
    step = schema.get("multipleOf")
    return (
        isinstance(value, number)
        and not isinstance(value, bool)
        and schema["minimum"] <= value <= schema["maximum"]
        and (step is None or abs(round(value / step) * step - value) < 1e-9)
    )


SCHEMAS = [_object(random.Random(seed)) for seed in range(30)]


def test_generator_and_validator_agree() -> None:
    kinds = json.dumps(SCHEMAS)
    assert all(word in kinds for word in ('"enum"', '"array"', '"minimum"', '"required"', '"properties": {"'))
    assert not _valid({}, {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]})
    assert not _valid(7, {"type": "integer", "minimum": 0, "maximum": 5})
    assert not _valid(0.125, {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01})


@pytest.mark.timeout(1200)  # sixty requests queue on one CPU node
async def test_thirty_generated_schemas_give_valid_json_streamed_and_not(url: str) -> None:  # noqa: F811
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=800)
    # Streams are read as raw SSE: on this shared CPU sixty requests take longer than the gateway's
    # 15 s keep-alive, which the SDK's stream decoder trips on (issue 15's first bug, fixed apart).
    http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=800)

    async def one(i: int, stream: bool) -> tuple[str, str | None]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Fill in this JSON object with example values."}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i]},
            },
            "temperature": 0,
            "max_tokens": 150,
        }
        if not stream:
            r = await client.chat.completions.create(**body)
            return r.choices[0].message.content or "", r.choices[0].finish_reason
        raw = (await http.post("/v1/chat/completions", json={**body, "stream": True})).text
        chunks = [json.loads(p) for p in sse_payloads(raw)[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        return text, chunks[-1]["choices"][0]["finish_reason"]

    try:
        results = await asyncio.gather(*(one(i, s) for i in range(len(SCHEMAS)) for s in (False, True)))
    finally:
        await client.close()
        await http.aclose()
    assert len(results) == 60
    bad = [
        (i // 2, text, reason)
        for i, (text, reason) in enumerate(results)
        if reason != "stop" or not _valid(json.loads(text), SCHEMAS[i // 2])
    ]
    assert not bad, bad


# ----------------------------------------------------------------------------- tools


def test_forced_tool_call_round_trip(url: str) -> None:  # noqa: F811
    client = sdk(url)
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,  # 135M with parallel calls allowed keeps calling until max_tokens
        temperature=0,
        max_tokens=60,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(
        json.loads(call.function.arguments)["city"], str
    )
    history = [
        *ASK_WEATHER,
        choice.message.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": json.dumps({"temperature_c": 21, "sky": "sunny"}),
        },
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=30
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


def test_streamed_argument_deltas_reassemble_into_the_whole_call(url: str) -> None:  # noqa: F811
    client = sdk(url)
    named = {"type": "function", "function": {"name": "get_weather"}}
    args = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": [WEATHER],
        "tool_choice": named,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**args, max_tokens=60).choices[0]  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(**args, max_tokens=60, stream=True))  # type: ignore[call-overload]
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len([d for d in deltas if d.function.arguments]) > 1  # the arguments came in pieces
    assert (
        "".join(d.function.arguments or "" for d in deltas) == whole.message.tool_calls[0].function.arguments
    )  # type: ignore[index]
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"


def test_langchain_bind_tools_and_structured_output(url: str) -> None:  # noqa: F811
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL, base_url=f"{url}/v1", api_key=KEY, temperature=0, max_tokens=80, max_retries=0
    )
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Rome?")
    assert message.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    assert isinstance(message.tool_calls[0]["args"]["city"], str)  # type: ignore[attr-defined]
    person = llm.with_structured_output(Person).invoke("Invent a person who lives in Rome.")
    assert isinstance(person, Person)
