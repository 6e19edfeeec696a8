"""Bus streams → OpenAI choices: start them together, fold their events, write the SSE body."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
from sse_starlette import EventSourceResponse, ServerSentEvent

from bus import BusError, Cancelled, ChatStream, Chunk, ContextLengthExceeded, Done, StreamEvent, error_for
from gateway.errors import ApiError, error_reply
from gateway.openai_format import Choice, Shape, usage_json
from gateway.resume import Recorder, event_id

__all__ = ["apply", "close_all", "sse_body", "sse_response", "start_all", "usage_of"]


async def start_all(streams: list[ChatStream], param: str) -> None:
    """Dispatch (or replay) every stream; if one fails, cancel the others and raise its error."""
    results = await asyncio.gather(*(s.start() for s in streams), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await close_all(streams)
        if isinstance(errors[0], ContextLengthExceeded):  # name the field that is too long
            err = error_reply(errors[0], param=param).body["error"]
            raise ApiError(400, err["message"], code=err["code"], param=param)
        raise errors[0]


async def close_all(streams: list[ChatStream]) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()


def apply(choice: Choice, event: StreamEvent) -> BusError | None:
    """Fold one bus event into its choice; the error to report when the stream failed."""
    choice.seq = event.seq
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


def usage_of(choices: list[Choice]) -> dict[str, int]:
    return usage_json(sum(c.prompt_tokens for c in choices), sum(c.completion_tokens for c in choices))


class _KeepAlive(ServerSentEvent):
    """A keep-alive that is one comment line, with no blank line after it.

    A comment followed by a blank line (sse-starlette's own ping) is, for the SSE spec, an event with
    no data to be ignored; but the OpenAI SDK's decoder dispatches it as an event with empty data once
    any earlier event carried an `id:` (it keeps the last id, as the spec says) and then fails on
    `json.loads("")`, mid-answer. A lone comment line dispatches nothing in any parser; the next
    event's blank line ends it. Frames are sent whole, so a ping never lands inside one.
    """

    def encode(self) -> bytes:
        return b": keep-alive\n"


def sse_response(
    body: AsyncIterator[bytes], ping_s: float, headers: dict[str, str] | None = None
) -> EventSourceResponse:
    """The streaming response for an SSE body, with keep-alives every `ping_s` seconds of it."""
    return EventSourceResponse(body, sep="\n", ping=ping_s, ping_message_factory=_KeepAlive, headers=headers)


def _frame(body: dict[str, Any], ident: str | None = None) -> bytes:
    head = b"id: " + ident.encode() + b"\n" if ident else b""
    return head + b"data: " + msgspec.json.encode(body) + b"\n\n"


async def _pump(i: int, stream: ChatStream, queue: asyncio.Queue[Any]) -> None:
    try:
        async for event in stream:
            await queue.put((i, event))
    except Exception as e:
        await queue.put((i, e))


async def sse_body(
    shape: Shape,
    choices: list[Choice],
    streams: list[ChatStream],
    include_usage: bool,
    recorder: Recorder | None = None,
    openings: bool = True,
) -> AsyncIterator[bytes]:
    """The SSE body: role/echo chunks, deltas, a finish chunk per choice, usage, [DONE].

    Each content event carries `id: <completion id>:<seq>` (see gateway/resume.py). A failure after
    the first byte becomes one `data: {"error": ...}` event, then the stream ends. Closing this
    generator (client gone) cancels every stream on its node. A resumed answer skips the openings
    the client has and the choices that had finished.
    """
    queue: asyncio.Queue[tuple[int, StreamEvent | Exception]] = asyncio.Queue()
    live = [i for i, s in enumerate(streams) if not s.finished]
    tasks = [asyncio.create_task(_pump(i, streams[i], queue)) for i in live]

    def chunk(parts: list[dict[str, Any]]) -> bytes:
        body = shape.chunk(parts)
        if include_usage:
            body["usage"] = None
        return _frame(body, event_id(shape.id, [c.seq for c in choices]))

    try:
        if openings:
            for choice in choices:
                opening = shape.opening(choice)
                if opening is not None:
                    yield chunk([opening])
        left = len(live)
        while left:
            i, event = await queue.get()
            if recorder is not None:
                await recorder.sync()
            choice = choices[i]
            error = event if isinstance(event, Exception) else apply(choice, event)
            if error is not None:
                yield _frame(error_reply(error).body)
                return
            if isinstance(event, Chunk):
                part = (
                    shape.delta(choice, event.text, event.logprobs) if event.text or event.logprobs else None
                )
                if part is not None:
                    yield chunk([part])
            elif isinstance(event, Done):
                left -= 1
                yield chunk([shape.closing(choice)])
        if include_usage:
            yield _frame(shape.chunk([], usage_of(choices)))
        yield b"data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        with anyio.move_on_after(10, shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_all(streams)
