"""Chat messages (with tools, tool calls and tool results) → prompt text through the tokenizer's template.

A template that knows tools (it mentions `tools`) gets them as `apply_chat_template(..., tools=...)`
and the history in Hugging Face's tool-calling shape. A template that does not (the default
SmolLM2's) gets the Hermes/Qwen convention folded into plain turns: the function signatures in the
system turn, earlier calls as `<tool_call>{json}</tool_call>` lines of the assistant turn, results as
`<tool_response>` user turns — the form the gateway parses back (gateway/tools.py). Engine-agnostic:
any engine with a Hugging Face tokenizer can call `render_chat`.
"""

from __future__ import annotations

import json
from typing import Any

from bus.schemas import ChatMessage, ToolCall, ToolSpec

__all__ = ["render_chat", "tool_system_prompt"]


def _function(tool: ToolSpec) -> dict[str, Any]:
    params: Any = {"type": "object", "properties": {}}
    if tool.parameters:
        params = json.loads(tool.parameters)
    return {"name": tool.name, "description": tool.description, "parameters": params}


def tool_system_prompt(tools: list[ToolSpec]) -> str:
    """The Hermes/Qwen 2.5 tool instructions, for templates without tool support."""
    signatures = "\n".join(json.dumps({"type": "function", "function": _function(t)}) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


def _call_text(call: ToolCall) -> str:
    return f'<tool_call>\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments}}}\n</tool_call>'


def _native_turn(m: ChatMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c)}}
            for c in m.tool_calls
        ]
    if m.role == "tool":
        turn["tool_call_id"] = m.tool_call_id
        if m.name:
            turn["name"] = m.name
    return turn


def _folded_turns(messages: list[ChatMessage], tools: list[ToolSpec]) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.role == "tool":
            text = f"<tool_response>\n{m.content}\n</tool_response>"
            if turns and turns[-1]["role"] == "user" and turns[-1]["content"].startswith("<tool_response>"):
                turns[-1]["content"] += "\n" + text  # results of parallel calls share one turn
            else:
                turns.append({"role": "user", "content": text})
            continue
        content = m.content
        if m.tool_calls:
            content = "\n".join([content, *map(_call_text, m.tool_calls)]).lstrip("\n")
        turns.append({"role": m.role, "content": content})
    if tools:
        prompt = tool_system_prompt(tools)
        if turns and turns[0]["role"] == "system":
            turns[0]["content"] = f"{turns[0]['content']}\n\n{prompt}"
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns


def render_chat(tokenizer: Any, messages: list[ChatMessage], tools: list[ToolSpec] | None = None) -> str:
    """The prompt text for `messages` (and `tools`), ending where the assistant's answer starts."""
    tools = tools or []
    template = getattr(tokenizer, "chat_template", None)
    if template and "tools" in template:
        turns: list[dict[str, Any]] = [_native_turn(m) for m in messages]
        specs = [{"type": "function", "function": _function(t)} for t in tools] or None
        return str(
            tokenizer.apply_chat_template(turns, tools=specs, tokenize=False, add_generation_prompt=True)
        )
    folded = _folded_turns(messages, tools)
    if template:
        return str(tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True))
    # The model has no template (DESIGN: only then a plain one).
    return "".join(f"{t['role']}: {t['content']}\n" for t in folded) + "assistant: "
