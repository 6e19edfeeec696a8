"""OpenAI tools, tool_choice and response_format → bus ToolSpecs and a Constraint, checked before any node work.

Every schema is compiled here with the node's own compiler (bus/constraints.py, torch-free), so a
schema, tool or grammar the compiler cannot handle is a 400 naming the parameter and the construct.
Tool calls come back as text in the Hermes/Qwen form the node's template teaches (node/prompting.py);
bus/tool_calls.py parses them out of the stream.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from bus import (
    BadRequest,
    Constraint,
    ToolSpec,
    compile_grammar,
    json_schema_constraint,
    tool_call_constraint,
)
from gateway.errors import ApiError

__all__ = ["MAX_TOOLS", "Plan", "plan_of"]

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Plan:
    """What the node is asked: tools for the template, a constraint, and whether to parse calls."""

    tools: list[ToolSpec] = field(default_factory=list)
    constraint: Constraint | None = None
    parse_calls: bool = False  # tool_choice is not "none": look for <tool_call> in the output
    param: str = "messages"  # the request field a node's rejection of the constraint points at


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def _compiled(constraint: Constraint, param: str) -> Constraint:
    try:
        compile_grammar(constraint)
    except BadRequest as e:
        raise ApiError(400, e.message, code="invalid_schema", param=param) from None
    return constraint


def _tool(i: int, raw: Any) -> ToolSpec:
    param = f"tools[{i}]"
    if (
        not isinstance(raw, dict)
        or raw.get("type") != "function"
        or not isinstance(raw.get("function"), dict)
    ):
        raise _bad(param, f'{param} must be {{"type": "function", "function": {{...}}}}')
    fn = raw["function"]
    unknown = set(raw) - {"type", "function"} | set(fn) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise _bad(param, f"{param} has unknown fields: {', '.join(sorted(unknown))}")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _bad(f"{param}.function.name", "a function name is 1-64 letters, digits, '_' or '-'")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise _bad(f"{param}.function.description", "description must be a string")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise _bad(f"{param}.function.parameters", "parameters must be a JSON Schema object")
    text = json.dumps(params) if params else ""
    if params:
        _compiled(json_schema_constraint(params), f"{param}.function.parameters")
    return ToolSpec(name=name, description=description, parameters=text)


def _tools(raw: Any) -> list[ToolSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("tools", "tools must be a list")
    if len(raw) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools, got {len(raw)}")
    specs = [_tool(i, t) for i, t in enumerate(raw)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise _bad("tools", "tool names must be unique")
    return specs


def _choice(raw: Any, tools: list[ToolSpec]) -> str:
    """'none', 'auto', 'required' or the forced function's name."""
    if raw is None:
        return "auto" if tools else "none"
    if raw in ("none", "auto", "required"):
        if raw != "none" and not tools:
            raise _bad("tool_choice", f"tool_choice {raw!r} needs tools")
        return str(raw)
    fn = raw.get("function") if isinstance(raw, dict) and raw.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _bad(
            "tool_choice",
            'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        )
    if name not in {t.name for t in tools}:
        raise _bad("tool_choice", f"tool_choice names {name!r}, which is not in tools")
    return name


def _response_constraint(raw: Any) -> Constraint | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_constraint({"type": "object"})
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _bad("response_format", "json_schema needs an object with a name and a schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict | bool):
            raise _bad("response_format", "json_schema.schema must be a JSON Schema object")
        return _compiled(json_schema_constraint(schema), "response_format")
    raise _bad("response_format", 'response_format type must be "text", "json_object" or "json_schema"')


def plan_of(tools: Any, tool_choice: Any, parallel: bool | None, response_format: Any) -> Plan:
    """The node-side plan for a chat request's tool and format parameters (a 400 for anything wrong)."""
    specs = _tools(tools)
    choice = _choice(tool_choice, specs)
    fmt = _response_constraint(response_format)
    if choice == "none":
        return Plan(constraint=fmt, param="response_format")  # tools are left out of generation
    if choice == "auto":
        return Plan(tools=specs, constraint=fmt, parse_calls=True, param="response_format")
    forced = specs if choice == "required" else [s for s in specs if s.name == choice]
    constraint = tool_call_constraint(forced, parallel=choice == "required" and parallel is not False)
    return Plan(tools=specs, constraint=_compiled(constraint, "tools"), parse_calls=True, param="tools")
