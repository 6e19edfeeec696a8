"""Constrained decoding inside HFEngine with the real default model: JSON, tool calls, mixed batches."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_engine import chat, run

from bus.constraints import json_schema_constraint, tool_call_constraint
from bus.errors import BadRequest, Unsupported
from bus.schemas import ChatMessage, Constraint, SamplingParams, ToolCall, ToolSpec
from node.engine import EngineRequest
from node.grammar import GrammarCompiler
from node.hf import HFEngine
from node.loader import LoadedModel, load_model
from node.prompting import render_chat

pytestmark = pytest.mark.model

CACHE = Path(os.environ.get("CHATBUS_TEST_CACHE", Path.home() / ".cache" / "chatbus-test"))
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"type": "string", "enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
PETS = {"type": "array", "items": {"enum": ["cat", "dog"]}, "minItems": 1, "maxItems": 3}
WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather in a city",
    parameters=json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
            "additionalProperties": False,
        }
    ),
)


@pytest.fixture(scope="module")
def loaded32() -> LoadedModel:
    return load_model(None, cache_dir=CACHE, dtype="float32", progress=lambda _: None)


@pytest.fixture(scope="module")
def engine(loaded32: LoadedModel) -> Iterator[HFEngine]:
    eng = HFEngine(loaded32, max_running=8)
    eng.start()
    yield eng
    eng.stop()


def constrained(
    request_id: str,
    text: str,
    constraint: Constraint,
    tools: list[ToolSpec] | None = None,
    max_tokens: int = 60,
) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        messages=[ChatMessage(role="user", content=text)],
        params=SamplingParams(temperature=0, max_tokens=max_tokens),
        constraint=constraint,
        tools=tools or [],
    )


def check_person(text: str) -> None:
    person = json.loads(text)
    assert set(person) == {"name", "age", "pet"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 20
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 120
    assert person["pet"] in ("cat", "dog", "none")


def check_call(text: str) -> None:
    assert text.startswith('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert text.endswith("}\n</tool_call>")
    call = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert set(call["arguments"]) == {"city"} and isinstance(call["arguments"]["city"], str)


def test_json_schema_output_parses_and_stops(engine: HFEngine) -> None:
    out = run(engine, constrained("j", "Describe a person as JSON.", json_schema_constraint(PERSON)))
    check_person(out.text("j"))
    assert out.last("j").finish_reason == "stop"


def test_forced_tool_call_matches_its_tool(engine: HFEngine) -> None:
    request = constrained("t", "What is the weather in Paris?", tool_call_constraint([WEATHER]), [WEATHER])
    out = run(engine, request)
    check_call(out.text("t"))
    assert out.last("t").finish_reason == "stop"


@pytest.mark.timeout(900)  # nine runs of a few dozen tokens on a shared 2-core CPU
def test_mixed_batch_of_eight_equals_each_row_alone(engine: HFEngine) -> None:
    requests = [
        chat("free-0", "What is the capital of France?", SamplingParams(temperature=0, max_tokens=12)),
        constrained("json-0", "Describe a person as JSON.", json_schema_constraint(PERSON)),
        constrained("tool-0", "Weather in Rome?", tool_call_constraint([WEATHER]), [WEATHER]),
        chat("free-1", "Name three colours.", SamplingParams(temperature=0, max_tokens=12)),
        constrained("json-1", "A JSON object for an old man with a dog.", json_schema_constraint(PERSON)),
        constrained("enum-0", "Two pets as a JSON list.", json_schema_constraint(PETS)),
        constrained(
            "tool-1", "Is it raining in Oslo?", tool_call_constraint([WEATHER], parallel=True), [WEATHER]
        ),
        constrained("re-0", "Pick a number.", Constraint(kind="regex", text="[0-9]{1,3}")),
    ]
    alone = {r.request_id: run(engine, r).text(r.request_id) for r in requests}
    together = run(engine, *requests)
    assert {rid: together.text(rid) for rid in alone} == alone
    check_person(alone["json-0"])
    check_person(alone["json-1"])
    check_call(alone["tool-0"])
    assert set(json.loads(alone["enum-0"])) <= {"cat", "dog"}
    assert alone["re-0"].isdigit() and len(alone["re-0"]) <= 3
    finished = {
        rid: together.last(rid).finish_reason for rid in ("json-0", "json-1", "tool-0", "enum-0", "re-0")
    }
    assert set(finished.values()) == {"stop"}, (finished, alone)
    assert alone["tool-1"].startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "')


def test_bad_constraints_are_refused_at_submit(engine: HFEngine) -> None:
    with pytest.raises(BadRequest, match="uniqueItems"):
        engine.submit(
            constrained("u", "x", json_schema_constraint({"type": "array", "uniqueItems": True})), print
        )
    with pytest.raises(Unsupported, match="kind"):
        engine.submit(constrained("k", "x", Constraint(kind="xml", text="<a/>")), print)
    with pytest.raises(Unsupported, match="version"):
        engine.submit(constrained("v", "x", Constraint(v=9, kind="regex", text="a")), print)


def test_mask_allows_exactly_the_grammars_tokens(loaded32: LoadedModel) -> None:
    compiler = GrammarCompiler.for_hf(loaded32.tokenizer, 49152, loaded32.eos_ids)
    row = compiler.row(Constraint(kind="regex", text="yes|no"))
    assert row is not None
    allowed = row.allowed()
    words = {loaded32.tokenizer.decode([t]) for t in torch.nonzero(allowed).flatten().tolist()}
    assert words and all("yes".startswith(w) or "no".startswith(w) for w in words)
    masked = row.mask(torch.zeros(49152))
    assert torch.isinf(masked).sum() == 49152 - len(words)
    for token in loaded32.tokenizer("yes", add_special_tokens=False)["input_ids"]:
        row.advance(token)
    assert row.done and torch.nonzero(row.allowed()).flatten().tolist() == loaded32.eos_ids


def test_tools_and_tool_turns_reach_the_template(loaded32: LoadedModel) -> None:
    messages = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(
            role="assistant",
            content="",
            tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')],
        ),
        ChatMessage(role="tool", content='{"temp": 21}', tool_call_id="call_1", name="get_weather"),
    ]
    text = render_chat(loaded32.tokenizer, messages, [WEATHER])
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_logit_bias_moves_the_greedy_choice(engine: HFEngine, loaded32: LoadedModel) -> None:
    plain = run(
        engine, chat("lb0", "What is the capital of France?", SamplingParams(temperature=0, max_tokens=3))
    )
    first = loaded32.tokenizer(plain.text("lb0"), add_special_tokens=False)["input_ids"][0]
    banned = SamplingParams(temperature=0, max_tokens=3, logit_bias={first: -100.0})
    assert (
        loaded32.tokenizer(run(engine, chat("lb1", "What is the capital of France?", banned)).text("lb1"))[
            "input_ids"
        ][0]
        != first
    )
    forced_id = loaded32.tokenizer(" London", add_special_tokens=False)["input_ids"][0]
    forced = SamplingParams(temperature=0, max_tokens=1, logit_bias={forced_id: 100.0})
    out = run(engine, chat("lb2", "What is the capital of France?", forced))
    assert out.text("lb2").strip() == loaded32.tokenizer.decode([forced_id]).strip()
    assert out.text("lb2").strip().startswith("Lon")
