"""POST /v1/responses: the stateless part of OpenAI's Responses API, over one bus stream.

Text, function tools, structured output (`text.format`) and streaming events in the order the SDK's
`client.responses.stream()` accumulates them. Nothing is stored: `previous_response_id` is a 400, and
every response says `store: false`. The request is mapped onto the chat machinery (gateway/tools.py
for tools and formats, bus/tool_calls.py for calls), so both APIs accept and refuse the same things.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from bus import (
    BusError,
    ChatMessage,
    ChatStream,
    Chunk,
    Done,
    SamplingParams,
    ToolCall,
    error_for,
)
from bus import ToolCallOutput as Output
from bus import ToolCallParser as CallParser
from gateway.errors import ApiError, error_reply
from gateway.http import check_bus, json_response, read_body
from gateway.schemas import parse
from gateway.streaming import close_all, sse_response, start_all
from gateway.tools import Plan, plan_of

__all__ = ["responses"]


class ResponsesRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    input: str | list[Any]
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: Any = None
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    stream: bool = False
    store: bool | None = None
    metadata: Any = None
    user: str | None = None
    previous_response_id: str | None = None
    reasoning: Any = None
    truncation: str | None = None
    include: Any = None


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, code="invalid_value", param=param)


def _text(param: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise ApiError(
                    400, f"{param}[{j}]: text parts only", code="unsupported_parameter", param=f"{param}[{j}]"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise _bad(param, "content must be a string or a list of text parts")


def _messages(req: ResponsesRequest) -> list[ChatMessage]:
    out = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for i, item in enumerate(items):
        param = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = {"developer": "system"}.get(item.get("role"), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise _bad(f"{param}.role", "role must be user, assistant, system or developer")
            out.append(ChatMessage(role=role, content=_text(f"{param}.content", item.get("content"))))
        elif kind == "function_call":
            if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
                raise _bad(param, "a function_call item needs call_id, name and arguments strings")
            call = ToolCall(id=item["call_id"], name=item["name"], arguments=item["arguments"])
            if out and out[-1].role == "assistant" and out[-1].tool_calls:
                out[-1] = msgspec.structs.replace(out[-1], tool_calls=[*out[-1].tool_calls, call])
            else:
                out.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise _bad(param, "a function_call_output item needs call_id and output strings")
            out.append(ChatMessage(role="tool", content=item["output"], tool_call_id=item["call_id"]))
        else:
            raise _bad(param, "input items are messages, function_call or function_call_output")
    if not out:
        raise _bad("input", "input must not be empty")
    return out


def _plan(req: ResponsesRequest) -> Plan:
    tools = []
    for i, tool in enumerate(req.tools or []):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ApiError(400, "only function tools", code="unsupported_parameter", param=f"tools[{i}]")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        tools.append({"type": "function", "function": fn})
    choice = req.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    fmt = (req.text or {}).get("format") if isinstance(req.text, dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": fmt.get("name", "output"), "schema": fmt.get("schema")},
        }
    try:
        return plan_of(tools or None, choice, req.parallel_tool_calls, fmt)
    except ApiError as e:
        if e.param == "response_format":
            e.param = "text.format"
        raise


def _sampling(req: ResponsesRequest) -> SamplingParams:
    if req.previous_response_id:
        raise ApiError(
            400,
            "responses are not stored; send the whole conversation as input",
            param="previous_response_id",
        )
    if req.reasoning not in (None, {}):
        raise ApiError(400, "no reasoning models", code="unsupported_parameter", param="reasoning")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise _bad("temperature", f"temperature must be in [0, 2], got {req.temperature}")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise _bad("top_p", f"top_p must be in (0, 1], got {req.top_p}")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise _bad("max_output_tokens", "max_output_tokens must be >= 1")
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=req.max_output_tokens,
    )


class _Builder:
    """The response object and its output items, built from parsed text as it arrives."""

    def __init__(self, req: ResponsesRequest, rid: str) -> None:
        self.req, self.id, self.created = req, f"resp_{rid}", int(time.time())
        self.output: list[dict[str, Any]] = []
        self.usage = (0, 0)
        self.status = "in_progress"
        self.incomplete: dict[str, str] | None = None

    def snapshot(self) -> dict[str, Any]:
        req = self.req
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "model": req.model,
            "output": self.output,
            "error": None,
            "incomplete_details": self.incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "text": req.text or {"format": {"type": "text"}},
            "metadata": req.metadata or {},
            "store": False,
            "usage": {
                "input_tokens": self.usage[0],
                "output_tokens": self.usage[1],
                "total_tokens": sum(self.usage),
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }

    def events(self, out: Output) -> list[dict[str, Any]]:
        """Stream events for new parsed output (items opened, deltas, earlier items closed)."""
        events: list[dict[str, Any]] = []
        if out.content:
            item = self.output[-1] if self.output else None
            if item is None or item["type"] != "message" or item["status"] != "in_progress":
                events += self._close()
                item = {
                    "type": "message",
                    "id": f"msg_{uuid.uuid4().hex}",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                }
                self.output.append(item)
                part = {"type": "output_text", "text": "", "annotations": []}
                events.append(
                    {
                        "type": "response.output_item.added",
                        "output_index": len(self.output) - 1,
                        "item": {**item, "content": []},
                    }
                )
                events.append(
                    {
                        "type": "response.content_part.added",
                        "item_id": item["id"],
                        "output_index": len(self.output) - 1,
                        "content_index": 0,
                        "part": dict(part),
                    }
                )
                item["content"].append(part)
            item["content"][0]["text"] += out.content
            events.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": item["id"],
                    "output_index": len(self.output) - 1,
                    "content_index": 0,
                    "delta": out.content,
                }
            )
        for call in out.calls:
            if call.id:
                events += self._close()
                item = {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex}",
                    "call_id": call.id,
                    "name": call.name,
                    "arguments": "",
                    "status": "in_progress",
                }
                self.output.append(item)
                events.append(
                    {
                        "type": "response.output_item.added",
                        "output_index": len(self.output) - 1,
                        "item": dict(item),
                    }
                )
            item = self.output[-1]
            if call.arguments:
                item["arguments"] += call.arguments
                events.append(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item["id"],
                        "output_index": len(self.output) - 1,
                        "delta": call.arguments,
                    }
                )
        return events

    def _close(self) -> list[dict[str, Any]]:
        if not self.output or self.output[-1]["status"] != "in_progress":
            return []
        item, index = self.output[-1], len(self.output) - 1
        item["status"] = "completed"
        events: list[dict[str, Any]] = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(
                {
                    "type": "response.output_text.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "text": part["text"],
                }
            )
            events.append(
                {
                    "type": "response.content_part.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": part,
                }
            )
        else:
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "arguments": item["arguments"],
                }
            )
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        return events

    def finish(self, done: Done, prompt_tokens: int) -> list[dict[str, Any]]:
        events = self._close()
        self.usage = (prompt_tokens, done.usage.completion_tokens)
        if done.finish_reason == "length":
            self.status, self.incomplete = "incomplete", {"reason": "max_output_tokens"}
        else:
            self.status = "completed"
        kind = "response.completed" if self.status == "completed" else "response.incomplete"
        return [*events, {"type": kind, "response": self.snapshot()}]


async def _run(
    stream: ChatStream, builder: _Builder, parser: CallParser | None
) -> AsyncIterator[dict[str, Any]]:
    async for event in stream:
        if isinstance(event, Chunk):
            out = parser.feed(event.text) if parser else Output(content=event.text)
            for e in builder.events(out):
                yield e
        elif isinstance(event, Done):
            if event.finish_reason == "cancelled":
                raise error_for("cancelled", "the generation was cancelled on its node; retry")
            if parser is not None:
                for e in builder.events(parser.flush()):
                    yield e
            for e in builder.finish(event, stream.prompt_tokens):
                yield e
            return
        else:
            raise error_for(event.code, f"generation failed on node {event.node_id or '?'}: {event.message}")


async def responses(request: Request) -> Response:
    client, config = request.app.state.client, request.app.state.config
    req = parse(await read_body(request, config.max_body_bytes), ResponsesRequest)
    params, messages, plan = _sampling(req), _messages(req), _plan(req)
    check_bus(client)
    stream = client.chat(
        req.model,
        messages,
        params,
        deadline_s=config.deadline_s,
        constraint=plan.constraint,
        tools=plan.tools,
    )
    await start_all([stream], "input")
    builder = _Builder(req, stream.request_id)
    parser = CallParser() if plan.parse_calls else None
    if not req.stream:
        try:
            async for _ in _run(stream, builder, parser):
                pass
        finally:
            await close_all([stream])
        return json_response(builder.snapshot())

    async def events() -> AsyncIterator[bytes]:
        seq = 0

        def frame(event: dict[str, Any]) -> bytes:
            nonlocal seq
            event["sequence_number"] = seq
            seq += 1
            return f"event: {event['type']}\n".encode() + b"data: " + msgspec.json.encode(event) + b"\n\n"

        try:
            yield frame({"type": "response.created", "response": builder.snapshot()})
            yield frame({"type": "response.in_progress", "response": builder.snapshot()})
            async for event in _run(stream, builder, parser):
                yield frame(event)
        except (BusError, ApiError) as e:
            err = error_reply(e).body["error"]
            yield frame(
                {"type": "error", "code": err["code"], "message": err["message"], "param": err["param"]}
            )
        finally:
            await close_all([stream])

    return sse_response(events(), config.sse_ping_s)
