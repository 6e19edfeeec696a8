"""Tools and structured outputs at the gateway, over a real nats-server and a scripted echo node (fast).

The echo engine answers with the last message's words, so a scripted `<tool_call>` text comes back
as an OpenAI tool call; and it records what reached it, so a 400 is seen to stop at the gateway.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from fakes import EchoEngine
from test_gateway_support import EchoNode, Gateway, LoopThread, gateway

from gateway import GatewayConfig

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def engine() -> EchoEngine:
    return EchoEngine("echo", step_s=0.002, max_running=8)


@pytest.fixture(scope="module")
def gw(nats_url: str, engine: EchoEngine):
    thread = LoopThread()
    try:
        with EchoNode(thread, nats_url, engine), gateway(thread, nats_url, GatewayConfig()) as g:
            deadline = time.monotonic() + 15
            while "echo" not in {m["id"] for m in httpx.get(f"{g.url}/v1/models").json()["data"]}:
                assert time.monotonic() < deadline, "the echo model never showed up"
                time.sleep(0.1)
            yield g
    finally:
        thread.stop()


def sdk(g: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key="unused", max_retries=0)


def test_scripted_call_comes_back_as_tool_calls_whole_and_streamed(gw: Gateway, engine: EchoEngine) -> None:
    messages = [{"role": "user", "content": f"Sure. {CALL_TEXT}"}]
    r = sdk(gw).chat.completions.create(model="echo", messages=messages, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Sure."
    call = message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and call.type == "function"
    sent = engine.submitted[-1]
    assert [t.name for t in sent.tools] == ["get_weather"] and sent.constraint is None
    with sdk(gw).chat.completions.stream(model="echo", messages=messages, tools=[WEATHER]) as stream:  # type: ignore[arg-type,list-item]
        final = stream.get_final_completion()
    streamed = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and streamed.content == "Sure."
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls or []] == [
        (call.function.name, call.function.arguments)
    ]


def test_forced_choices_and_formats_travel_as_constraints(gw: Gateway, engine: EchoEngine) -> None:
    client = sdk(gw)
    user = [{"role": "user", "content": "hi"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    client.chat.completions.create(model="echo", messages=user, tools=[WEATHER], tool_choice=named)  # type: ignore[arg-type,list-item]
    forced = engine.submitted[-1].constraint
    assert forced is not None and forced.kind == "lark" and '\\"name\\": \\"get_weather\\"' in forced.text
    client.chat.completions.create(model="echo", messages=user, response_format={"type": "json_object"})  # type: ignore[arg-type]
    assert engine.submitted[-1].constraint is not None
    assert json.loads(engine.submitted[-1].constraint.text) == {"type": "object"}
    client.chat.completions.create(model="echo", messages=user, tools=[WEATHER], tool_choice="none")  # type: ignore[arg-type,list-item]
    assert engine.submitted[-1].tools == [] and engine.submitted[-1].constraint is None
    client.chat.completions.create(model="echo", messages=user, logit_bias={"42": -100})  # type: ignore[arg-type]
    assert engine.submitted[-1].params.logit_bias == {42: -100.0}


def test_tool_history_is_accepted(gw: Gateway, engine: EchoEngine) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = sdk(gw).chat.completions.create(model="echo", messages=history, tools=[WEATHER])  # type: ignore[arg-type,list-item]
    assert r.choices[0].message.content == "sunny"
    sent = engine.submitted[-1].messages or []
    assert sent[1].tool_calls[0].name == "get_weather" and sent[2].tool_call_id == "call_1"


BAD = {
    "invalid schema": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "strnig"}},
            }
        },
        "response_format",
    ),
    "unimplemented keyword": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
        "response_format",
    ),
    "too large schema": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {
                        "type": "object",
                        "properties": {f"field_{i}": {"type": "string"} for i in range(3000)},
                    },
                },
            }
        },
        "response_format",
    ),
    "unknown tool in tool_choice": (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    "tool message without id": (
        {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]},
        "messages[1].tool_call_id",
    ),
    "tool message answering nothing": (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "tool", "content": "y", "tool_call_id": "c9"},
            ]
        },
        "messages[1].tool_call_id",
    ),
    "malformed tool call": (
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": "f"}]}]},
        "messages[0].tool_calls[0]",
    ),
    "tool calls on a user turn": (
        {"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}]},
        "messages[0].tool_calls",
    ),
    "bad tool parameters": (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}]},
        "tools[0].function.parameters",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tools_and_schemas_are_400s_that_never_reach_a_node(
    gw: Gateway, engine: EchoEngine, case: str
) -> None:
    extra, param = BAD[case]
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], **extra}
    before = len(engine.submitted)
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert len(engine.submitted) == before


# ----------------------------------------------------------------------------- /v1/responses

FLAT_WEATHER = {"type": "function", **WEATHER["function"]}  # type: ignore[dict-item]


def test_responses_text_tools_and_format(gw: Gateway, engine: EchoEngine) -> None:
    client = sdk(gw)
    r = client.responses.create(model="echo", input="hello there", instructions="be brief")
    assert (
        r.output_text == "hello there" and r.status == "completed" and r.usage and r.usage.output_tokens == 2
    )
    assert engine.submitted[-1].messages[0].role == "system"  # type: ignore[index]
    called = client.responses.create(model="echo", input=f"Sure. {CALL_TEXT}", tools=[FLAT_WEATHER])  # type: ignore[list-item]
    kinds = [item.type for item in called.output]
    assert kinds == ["message", "function_call"] and called.output_text == "Sure."
    call = called.output[1]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    history = [
        {"role": "user", "content": "weather?"},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": "{}"},  # type: ignore[union-attr]
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny today"},  # type: ignore[union-attr]
    ]
    assert (
        client.responses.create(model="echo", input=history, tools=[FLAT_WEATHER]).output_text
        == "sunny today"
    )  # type: ignore[arg-type,list-item]
    fmt = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}
    client.responses.create(model="echo", input="{}", text=fmt)  # type: ignore[arg-type]
    assert engine.submitted[-1].constraint is not None


def test_responses_stream_events_accumulate_in_the_sdk(gw: Gateway) -> None:
    with sdk(gw).responses.stream(model="echo", input=f"Sure. {CALL_TEXT}", tools=[FLAT_WEATHER]) as stream:  # type: ignore[list-item]
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.function_call_arguments.delta" in kinds
    assert final.output_text == "Sure." and final.output[1].name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(final.output[1].arguments) == {"city": "Paris"}  # type: ignore[union-attr]


def test_responses_refuse_what_they_cannot_do(gw: Gateway, engine: EchoEngine) -> None:
    before = len(engine.submitted)
    for extra, param in [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}}, "text.format"),
    ]:
        r = httpx.post(f"{gw.url}/v1/responses", json={"model": "echo", "input": "hi", **extra}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert len(engine.submitted) == before
