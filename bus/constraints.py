"""Constraint → llguidance grammar: the one compile-and-check step every edge and every node calls.

Torch-free (llguidance has no dependencies), so the gateway rejects a schema the compiler cannot
handle with a 400 naming the construct before any node sees it, and a node compiles exactly the same
text. JSON is compiled with fixed separators (", " and ": ") and no free whitespace: a small model
cannot then spin in newlines and run out of tokens mid-document.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from bus.errors import BadRequest, Unsupported
from bus.schemas import CONSTRAINT_VERSION, Constraint, ToolSpec

__all__ = [
    "KINDS",
    "MAX_CONSTRAINT_CHARS",
    "compile_grammar",
    "json_options",
    "json_schema_constraint",
    "tool_call_constraint",
]

KINDS = ("json_schema", "regex", "lark")
MAX_CONSTRAINT_CHARS = 64_000  # a bigger schema or grammar is refused (compile time, node memory)
_MAX_GRAMMAR_SIZE = 200_000  # llguidance symbols; its own default is 500k


def json_options() -> dict[str, Any]:
    """The llguidance JSON options chatbus compiles every schema with (`x-guidance`)."""
    return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_constraint(schema: dict[str, Any] | bool) -> Constraint:
    """A json_schema Constraint for a schema given as Python data."""
    return Constraint(kind="json_schema", text=json.dumps(schema, separators=(",", ":")))


def tool_call_constraint(tools: list[ToolSpec], parallel: bool = False) -> Constraint:
    """Output that is one (or, with `parallel`, one or more) Hermes/Qwen tool calls to `tools`:

        <tool_call>
        {"name": "<one of tools>", "arguments": <JSON valid against its parameters>}
        </tool_call>

    The name and keys are fixed text, so the model only chooses the function and its arguments;
    bus/tool_calls.py parses the result.
    """
    if not tools:
        raise BadRequest("a tool call constraint needs at least one tool")
    tail = json.dumps("}\n</tool_call>")
    rules = []
    for i, tool in enumerate(tools):
        params: Any = json.loads(tool.parameters) if tool.parameters else {"type": "object"}
        if isinstance(params, dict):
            params = {**params, "x-guidance": json_options()}
        head = json.dumps(f'<tool_call>\n{{"name": {json.dumps(tool.name)}, "arguments": ')
        rules.append(f"call_{i}: {head} args_{i} {tail}")
        rules.append(f"args_{i}: %json {json.dumps(params)}")
    calls = " | ".join(f"call_{i}" for i in range(len(tools)))
    start = f"start: call ({json.dumps(chr(10))} call)*" if parallel else "start: call"
    lark = "\n".join(["%llguidance {}", start, f"call: {calls}", *rules])
    return Constraint(kind="lark", text=lark + "\n")


def compile_grammar(constraint: Constraint) -> str:
    """The llguidance grammar for `constraint`, or BadRequest naming what the compiler cannot handle.

    Unsupported (a BadRequest) for a kind or version this release does not know. Cached by value.
    """
    if constraint.v > CONSTRAINT_VERSION:
        raise Unsupported(
            f"constraint version {constraint.v} is newer than this release honours ({CONSTRAINT_VERSION})"
        )
    if constraint.kind not in KINDS:
        raise Unsupported(f"constraint kind {constraint.kind!r} is not one of {', '.join(KINDS)}")
    if len(constraint.text) > MAX_CONSTRAINT_CHARS:
        raise BadRequest(
            f"the {constraint.kind} is too large ({len(constraint.text)} characters; "
            f"at most {MAX_CONSTRAINT_CHARS})"
        )
    return _compile(constraint.kind, constraint.text)


@functools.lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> str:
    import llguidance  # imported here: a bus client that never constrains does not load it

    matcher = llguidance.LLMatcher
    if kind == "json_schema":
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise BadRequest(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise BadRequest("a JSON schema must be an object (or true/false)")
        grammar = matcher.grammar_from_json_schema(text, defaults=json_options())  # type: ignore[arg-type]
        what = "JSON schema"
    elif kind == "regex":
        grammar, what = matcher.grammar_from_regex(text), "regex"
    else:
        grammar, what = matcher.grammar_from_lark(text), "grammar"
    limits = llguidance.LLParserLimits(max_grammar_size=_MAX_GRAMMAR_SIZE, verbose_errors=False)
    is_error, messages = matcher.validate_grammar_with_warnings(grammar, None, limits=limits)
    if is_error:
        detail = messages[0].strip() if messages else "unknown error"
        raise BadRequest(f"the {what} cannot be compiled for constrained decoding: {detail}")
    return grammar
