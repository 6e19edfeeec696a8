"""gateway/tool_calls.py and gateway/tools.py without a model: parsing, streaming pieces, plans and their 400s."""

from __future__ import annotations

import json

import pytest

from bus.tool_calls import CallParser, Output, readable
from gateway.errors import ApiError
from gateway.tools import plan_of

TWO_CALLS = (
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], "note": "a}b\\"c"}}\n'
    "</tool_call>\n"
    '<tool_call>\n{"arguments": {"q": "x"}, "name": "search"}\n</tool_call>'
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def pieces(text: str, size: int) -> Output:
    """Feed `text` `size` characters at a time; merge what came out as a client would."""
    parser, merged = CallParser(), Output()
    outs = [parser.feed(text[i : i + size]) for i in range(0, len(text), size)] + [parser.flush()]
    for out in outs:
        merged.content += out.content
        for call in out.calls:
            merged.add(call)
    return merged


def test_calls_parse_whole_and_streamed_alike() -> None:
    whole = pieces(TWO_CALLS, len(TWO_CALLS))
    assert whole.content == "Let me check."
    assert [c.name for c in whole.calls] == ["get_weather", "search"]
    assert json.loads(whole.calls[0].arguments) == {"city": "Paris", "days": [1, 2], "note": 'a}b"c'}
    assert json.loads(whole.calls[1].arguments) == {"q": "x"}
    for size in (1, 2, 3, 7):
        streamed = pieces(TWO_CALLS, size)
        assert streamed.content == whole.content
        assert [(c.index, c.name, c.arguments) for c in streamed.calls] == [
            (c.index, c.name, c.arguments) for c in whole.calls
        ]


def test_arguments_stream_before_the_call_closes() -> None:
    parser = CallParser()
    first = parser.feed('<tool_call>\n{"name": "f", "arguments": {"a": 1')
    assert [(c.name, c.arguments) for c in first.calls] == [("f", '{"a": 1')] and first.calls[0].id
    second = parser.feed(', "b": 2}}\n</tool_call>')
    assert [(c.id, c.arguments) for c in second.calls] == [("", ', "b": 2}')]
    assert parser.count == 1


def test_plain_text_and_broken_blocks_stay_content() -> None:
    assert pieces("Hello <tool world", 3).content == "Hello <tool world"
    broken = "<tool_call>\nnot json\n</tool_call> after"
    out = pieces(broken, 4)
    assert out.calls == [] and out.content == broken


def test_plans_for_each_tool_choice() -> None:
    assert plan_of(None, None, None, None).constraint is None
    auto = plan_of([WEATHER], None, None, None)
    assert auto.parse_calls and auto.constraint is None and auto.tools[0].name == "get_weather"
    assert plan_of([WEATHER], "none", None, None).tools == []
    forced = plan_of([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, None)
    assert forced.constraint is not None and forced.constraint.kind == "lark" and forced.param == "tools"
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert plan_of(None, None, None, schema).constraint is not None


@pytest.mark.parametrize(
    ("args", "param", "words"),
    [
        (([WEATHER], {"type": "function", "function": {"name": "nope"}}, None, None), "tool_choice", "nope"),
        ((None, "required", None, None), "tool_choice", "needs tools"),
        (
            ([{"type": "function", "function": {"name": "bad name"}}], None, None, None),
            "tools[0].function.name",
            "",
        ),
        (
            (
                [{"type": "function", "function": {"name": "f", "parameters": {"type": "strnig"}}}],
                None,
                None,
                None,
            ),
            "tools[0].function.parameters",
            "strnig",
        ),
        ((None, None, None, {"type": "yaml"}), "response_format", "json_schema"),
        (
            (None, None, None, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}),
            "response_format",
            "not",
        ),
    ],
)
def test_bad_tool_and_format_parameters_are_400s(args: tuple, param: str, words: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ApiError) as e:
        plan_of(*args)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_readable_formats_json_answers_and_tool_calls_for_the_uis() -> None:
    assert readable('{"a": [1, 2]}') == '```json\n{\n  "a": [\n    1,\n    2\n  ]\n}\n```'
    shown = readable(TWO_CALLS)
    assert shown.startswith("Let me check.\n\n**Tool call** `get_weather`\n```json\n{\n")
    assert "**Tool call** `search`" in shown
    assert readable("just text, <tool_call> unclosed") == "just text, <tool_call> unclosed"
    assert readable("42") == "42"  # a bare number is an answer, not a JSON document
