"""A node's request/reply answers: decode the request, run its handler, reply with the result or a
`Rejected` (generation's admission, token counts, embeddings)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg

from bus.codec import decode, encode
from bus.errors import BadRequest, BusError, Code
from bus.schemas import CountReply, CountRequest, EmbedReply, EmbedRequest, Rejected
from node.engine import Engine

__all__ = ["answer", "count_tokens", "embed"]

log = logging.getLogger("node.service")


async def answer(
    msg: Msg,
    type_: type,
    handler: Callable[[Any], Awaitable[msgspec.Struct]],
    *,
    node_id: str,
    respond: Callable[[Msg, bytes], Awaitable[None]],
) -> None:
    """Reply to `msg` with `handler`'s answer to its decoded request, or with why not (a Rejected)."""
    if not msg.reply:
        log.warning("ignoring a message on %s without a reply subject (%d bytes)", msg.subject, len(msg.data))
        return
    try:
        reply = await handler(decode(msg.data, type_))
    except BusError as e:
        log.warning("rejecting a bad message on %s: %s", msg.subject, e)
        reply = Rejected(request_id="", node_id=node_id, code=e.code.value, message=e.message)
    except Exception as e:
        log.exception("%s failed", type_.__name__)
        reply = Rejected(request_id="", node_id=node_id, code=Code.INTERNAL.value, message=str(e))
    await respond(msg, encode(reply))


async def count_tokens(engine: Engine, req: CountRequest) -> CountReply:
    if (req.messages is None) == (req.prompt is None):
        raise BadRequest("a count request needs exactly one of messages or prompt")
    n = await asyncio.to_thread(engine.count_tokens, req.messages, req.prompt)
    return CountReply(tokens=n, context_length=engine.card.context_length)


async def embed(engine: Engine, req: EmbedRequest) -> EmbedReply:
    if not req.inputs:
        raise BadRequest("input must not be empty")
    vectors, tokens = await asyncio.to_thread(engine.embed, req.inputs)
    return EmbedReply(embeddings=vectors, prompt_tokens=tokens)
