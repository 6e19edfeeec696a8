"""POST /v1/chat/completions and /v1/completions: n concurrent bus streams → OpenAI JSON or SSE."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from bus import BusClient, ChatStream, Chunk, Done, SamplingParams
from bus.errors import BusError, Cancelled, ContextLengthExceeded, error_for
from bus.schemas import GenerateRequest, StreamEvent
from gateway.config import GatewayConfig
from gateway.errors import ApiError, error_reply
from gateway.http import check_bus, check_payload, json_response, read_body, unless_disconnected
from gateway.openai_format import Choice, Shape, chat_shape, completion_shape, usage_json
from gateway.schemas import (
    ChatRequest,
    CompletionRequest,
    chat_messages,
    chat_sampling,
    completion_prompts,
    completion_sampling,
    parse,
)

__all__ = ["chat_completions", "completions"]

Plan = list[tuple[Choice, Callable[[], ChatStream]]]


def _state(request: Request) -> tuple[BusClient, GatewayConfig]:
    return request.app.state.client, request.app.state.config


def _check_n(n: int, config: GatewayConfig) -> None:
    if n > config.max_n:
        raise ApiError(400, f"n must be <= {config.max_n} on this gateway, got {n}", param="n")


def _nth(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i of a seeded request gets seed + i, so n choices differ yet stay reproducible."""
    if i == 0 or params.seed is None:
        return params
    return msgspec.structs.replace(params, seed=params.seed + i)


async def chat_completions(request: Request) -> Response:
    client, config = _state(request)
    req = parse(await read_body(request, config.max_body_bytes), ChatRequest)
    params = chat_sampling(req)
    messages = chat_messages(req.messages)
    _check_n(req.n, config)
    check_bus(client)
    probe = GenerateRequest(request_id="0" * 32, model=req.model, messages=messages, params=params)
    check_payload(client, probe, "messages")

    def make(i: int) -> Callable[[], ChatStream]:
        return lambda: client.chat(req.model, messages, _nth(params, i), deadline_s=config.deadline_s)

    plan = [(Choice(index=i), make(i)) for i in range(req.n)]
    return await _serve(request, req, plan, chat_shape, param="messages")


async def completions(request: Request) -> Response:
    client, config = _state(request)
    req = parse(await read_body(request, config.max_body_bytes), CompletionRequest)
    params = completion_sampling(req)
    prompts = completion_prompts(req)
    _check_n(req.n * len(prompts), config)
    check_bus(client)
    for prompt in prompts:
        probe = GenerateRequest(request_id="0" * 32, model=req.model, prompt=prompt, params=params)
        check_payload(client, probe, "prompt")

    def make(prompt: str, i: int) -> Callable[[], ChatStream]:
        return lambda: client.complete(req.model, prompt, _nth(params, i), deadline_s=config.deadline_s)

    plan = [
        (Choice(index=p * req.n + i, prefix=prompt if req.echo else ""), make(prompt, i))
        for p, prompt in enumerate(prompts)
        for i in range(req.n)
    ]
    return await _serve(request, req, plan, completion_shape, param="prompt")


async def _serve(
    request: Request,
    req: ChatRequest | CompletionRequest,
    plan: Plan,
    shape_of: Callable[[str, str, int, bool], Shape],
    param: str,
) -> Response:
    choices = [c for c, _ in plan]
    streams = [make() for _, make in plan]
    await _start_all(streams, param)
    # Usage counts each prompt once, as OpenAI does for n > 1.
    for choice, stream in zip(choices, streams, strict=True):
        choice.prompt_tokens = stream.prompt_tokens if choice.index % req.n == 0 else 0
    logprobs = bool(req.logprobs) if isinstance(req, ChatRequest) else req.logprobs is not None
    shape = shape_of(streams[0].request_id, req.model, int(time.time()), logprobs)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        _, config = _state(request)
        return EventSourceResponse(
            _sse(shape, choices, streams, include_usage), sep="\n", ping=config.sse_ping_s
        )
    body = await unless_disconnected(request, _collect(shape, choices, streams))
    if body is None:  # the client hung up; the streams were cancelled on their nodes
        return Response(status_code=499)
    return json_response(body)


async def _start_all(streams: list[ChatStream], param: str) -> None:
    """Dispatch every stream; if one fails, cancel the others and raise its error."""
    results = await asyncio.gather(*(s.start() for s in streams), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await _close_all(streams)
        if isinstance(errors[0], ContextLengthExceeded):  # name the field that is too long
            err = error_reply(errors[0], param=param).body["error"]
            raise ApiError(400, err["message"], code=err["code"], param=param)
        raise errors[0]


async def _close_all(streams: list[ChatStream]) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()


def _apply(choice: Choice, event: StreamEvent) -> BusError | None:
    """Fold one bus event into its choice; the error to report when the stream failed."""
    if isinstance(event, Chunk):
        choice.text.append(event.text)
        if event.logprobs:
            choice.logprobs.extend(event.logprobs)
        return None
    if isinstance(event, Done):
        if event.finish_reason == "cancelled":
            return Cancelled("the generation was cancelled on its node before it finished; retry")
        choice.finish_reason = event.finish_reason
        choice.completion_tokens = event.usage.completion_tokens
        return None
    return error_for(event.code, f"generation failed on node {event.node_id or '?'}: {event.message}")


def _usage(choices: list[Choice]) -> dict[str, int]:
    return usage_json(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices))


async def _collect(shape: Shape, choices: list[Choice], streams: list[ChatStream]) -> dict[str, Any]:
    async def one(choice: Choice, stream: ChatStream) -> None:
        async for event in stream:
            error = _apply(choice, event)
            if error is not None:
                raise error

    tasks = [asyncio.create_task(one(c, s)) for c, s in zip(choices, streams, strict=True)]
    try:
        for task in asyncio.as_completed(tasks):
            await task
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all(streams)
    return shape.whole(choices, _usage(choices))


def _frame(body: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


async def _pump(choice: Choice, stream: ChatStream, queue: asyncio.Queue[Any]) -> None:
    try:
        async for event in stream:
            await queue.put((choice, event))
    except Exception as e:
        await queue.put((choice, e))


async def _sse(
    shape: Shape, choices: list[Choice], streams: list[ChatStream], include_usage: bool
) -> AsyncIterator[bytes]:
    """The SSE body: role/echo chunks, deltas, a finish chunk per choice, usage, [DONE].

    A failure after the first byte becomes one `data: {"error": ...}` event, then the stream ends.
    Closing this generator (client gone) cancels every stream on its node.
    """
    queue: asyncio.Queue[tuple[Choice, StreamEvent | Exception]] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(c, s, queue)) for c, s in zip(choices, streams, strict=True)]

    def chunk(parts: list[dict[str, Any]]) -> bytes:
        body = shape.chunk(parts)
        if include_usage:
            body["usage"] = None
        return _frame(body)

    try:
        for choice in choices:
            opening = shape.opening(choice)
            if opening is not None:
                yield chunk([opening])
        left = len(choices)
        while left:
            choice, event = await queue.get()
            error = event if isinstance(event, Exception) else _apply(choice, event)
            if error is not None:
                yield _frame(error_reply(error).body)
                return
            if isinstance(event, Chunk):
                if event.text or event.logprobs:
                    yield chunk([shape.delta(choice, event.text, event.logprobs)])
            elif isinstance(event, Done):
                left -= 1
                yield chunk([shape.closing(choice)])
        if include_usage:
            yield _frame(shape.chunk([], _usage(choices)))
        yield b"data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        with anyio.move_on_after(10, shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all(streams)
