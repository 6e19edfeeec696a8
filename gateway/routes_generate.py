"""POST /v1/chat/completions and /v1/completions: n concurrent bus streams → OpenAI JSON or SSE;
GET .../{id}/stream resumes a stream (see gateway/resume.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response

from bus import (
    BadRequest,
    BusClient,
    BusError,
    ChatStream,
    ContextLengthExceeded,
    SamplingParams,
)
from bus import ToolCallParser as CallParser
from bus import bind_log_fields as bind
from gateway.config import GatewayConfig
from gateway.context import request_id
from gateway.errors import ApiError
from gateway.http import check_bus, json_response, read_body, unless_disconnected
from gateway.openai_format import Choice, Shape, chat_shape, completion_shape
from gateway.operations import GatewayOps, admit, count_failovers, tracked
from gateway.resume import ChoiceRecord, Recorder, ResumeRecord, key_of, load, resume_point
from gateway.schemas import (
    ChatRequest,
    CompletionRequest,
    chat_messages,
    chat_sampling,
    completion_prompts,
    completion_sampling,
    parse,
)
from gateway.streaming import apply, close_all, sse_body, sse_response, start_all, usage_of
from gateway.tools import plan_of

__all__ = ["chat_completions", "completions", "resume_chat", "resume_completion"]

Plan = list[tuple[Choice, Callable[[], ChatStream]]]


def _state(request: Request) -> tuple[BusClient, GatewayConfig]:
    return request.app.state.client, request.app.state.config


def _check_n(n: int, config: GatewayConfig) -> None:
    if n > config.max_n:
        raise ApiError(400, f"n must be <= {config.max_n} on this gateway, got {n}", param="n")


def _check_max_tokens(client: BusClient, model: str, params: SamplingParams) -> None:
    """A max_tokens no node of the model could ever honour is the caller's mistake: say so here."""
    entry = client.models().get(model)
    if entry is not None and params.max_tokens is not None and params.max_tokens > entry.context_length:
        raise ApiError(
            400,
            f"max_tokens {params.max_tokens} is over the context length of {model!r} "
            f"({entry.context_length} tokens, prompt included)",
            code="context_length_exceeded",
            param="max_tokens",
        )


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
    tools = plan_of(req.tools, req.tool_choice, req.parallel_tool_calls, req.response_format)
    _check_n(req.n, config)
    check_bus(client)
    _check_max_tokens(client, req.model, params)

    trace = request_id(request)

    def make(i: int) -> Callable[[], ChatStream]:
        return lambda: client.chat(
            req.model,
            messages,
            _nth(params, i),
            deadline_s=config.deadline_s,
            trace_id=trace,
            constraint=tools.constraint,
            tools=tools.tools,
        )

    plan = [
        (Choice(index=i, calls=CallParser() if tools.parse_calls else None), make(i)) for i in range(req.n)
    ]
    try:
        return await _serve(request, req, plan, chat_shape, param="messages")
    except BadRequest as e:  # a node refused the constraint (an older node, or a compiler limit)
        if tools.constraint is None or isinstance(e, ContextLengthExceeded):
            raise
        raise ApiError(400, e.message, code=e.code.value, param=tools.param) from None


async def completions(request: Request) -> Response:
    client, config = _state(request)
    req = parse(await read_body(request, config.max_body_bytes), CompletionRequest)
    params = completion_sampling(req)
    prompts = completion_prompts(req)
    _check_n(req.n * len(prompts), config)
    check_bus(client)
    _check_max_tokens(client, req.model, params)

    trace = request_id(request)

    def make(prompt: str, i: int) -> Callable[[], ChatStream]:
        return lambda: client.complete(
            req.model, prompt, _nth(params, i), deadline_s=config.deadline_s, trace_id=trace
        )

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
    client, config = _state(request)
    ops: GatewayOps = request.app.state.ops
    bind(model=req.model)
    lease = await admit(request, req.model)
    headers = lease.headers if lease is not None else {}
    choices = [c for c, _ in plan]
    streams = [make() for _, make in plan]
    try:
        await start_all(streams, param)
    except BaseException:
        if lease is not None:
            await lease.release(answered=False)
        raise

    def used() -> tuple[int, int]:
        return sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices)

    # Usage counts each prompt once, as OpenAI does for n > 1.
    for choice, stream in zip(choices, streams, strict=True):
        choice.prompt_tokens = stream.prompt_tokens if choice.index % req.n == 0 else 0
    logprobs = bool(req.logprobs) if isinstance(req, ChatRequest) else req.logprobs is not None
    shape = shape_of(streams[0].request_id, req.model, int(time.time()), logprobs)
    if not req.stream:
        try:
            body = await unless_disconnected(request, _collect(shape, choices, streams))
        except BaseException:
            count_failovers(ops, streams)
            if lease is not None:
                await lease.release(*used())  # started on a node: a request, even if it failed
            raise
        count_failovers(ops, streams)
        # the client hung up (None): the streams were cancelled on their nodes
        response = Response(status_code=499) if body is None else json_response(body, headers=headers)
        if lease is not None:  # counted once the answer is sent: the client does not wait for it
            response.background = BackgroundTask(lease.release, *used())
        return response
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    record = ResumeRecord(
        chat=shape.chat,
        model=req.model,
        created=shape.created,
        choices=[
            ChoiceRecord(request=s.request, attempts=[], prefix=c.prefix, prompt_tokens=c.prompt_tokens)
            for c, s in zip(choices, streams, strict=True)
        ],
        logprobs=logprobs,
        include_usage=include_usage,
        key=key_of(request),
    )
    recorder = Recorder(client, streams[0].request_id, record, streams)
    await recorder.save()
    events = tracked(ops, sse_body(shape, choices, streams, include_usage, recorder), streams, lease, used)
    return sse_response(events, config.sse_ping_s, headers)


async def _collect(shape: Shape, choices: list[Choice], streams: list[ChatStream]) -> dict[str, Any]:
    async def one(choice: Choice, stream: ChatStream) -> None:
        async for event in stream:
            error = apply(choice, event)
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
            await close_all(streams)
    return shape.whole(choices, usage_of(choices))


# ----------------------------------------------------------------------------- resume


async def resume_chat(request: Request) -> Response:
    return await _resume(request, chat=True)


async def resume_completion(request: Request) -> Response:
    return await _resume(request, chat=False)


async def _resume(request: Request, chat: bool) -> Response:
    """The rest of a stream after the client's Last-Event-ID, served by this (or any) gateway."""
    client, config = _state(request)
    check_bus(client)
    completion_id = request.path_params["completion_id"]
    prefix = "chatcmpl-" if chat else "cmpl-"  # as chat_shape / completion_shape name them
    record = await load(client, completion_id, prefix, key_of(request))
    after = resume_point(request, completion_id, len(record.choices))
    streams = [
        client.resume(c.request, c.attempts, after=after[i] if after else 0, prompt_tokens=c.prompt_tokens)
        for i, c in enumerate(record.choices)
    ]
    await start_all(streams, "Last-Event-ID")
    choices = []
    for i, (saved, stream) in enumerate(zip(record.choices, streams, strict=True)):
        choice = Choice(index=i, prefix=saved.prefix, prompt_tokens=saved.prompt_tokens)
        choice.text.append(stream.text)  # what the client has: completion logprob offsets count it
        choice.seq = after[i] if after else 0
        if stream.result is not None:  # the client has seen this choice end
            error = apply(choice, stream.result)
            if isinstance(error, BusError):
                raise error
        choices.append(choice)
    shape = Shape(chat, completion_id, record.model, record.created, record.logprobs)
    recorder = Recorder(client, completion_id.removeprefix(prefix), record, streams)
    body = sse_body(shape, choices, streams, record.include_usage, recorder, openings=after is None)
    ops: GatewayOps = request.app.state.ops
    ops.metrics.resumes.inc()
    return sse_response(tracked(ops, body, streams, None, None), config.sse_ping_s)
