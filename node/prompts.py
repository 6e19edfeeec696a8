"""Prompts → token ids with the tokenizer's own chat template, the same way for every engine.

The torch engine (node/hf.py) and engines that decode elsewhere (node/llamacpp.py) call these, so all
prefill exactly the same ids for one request; and the one check on sampling ranges.
"""

from __future__ import annotations

from typing import Any

from bus.errors import BadRequest
from bus.schemas import ChatMessage, SamplingParams, ToolSpec
from node.prompting import render_chat

__all__ = ["encode", "validate"]


def encode(
    tokenizer: Any,
    messages: list[ChatMessage] | None,
    prompt: str | None,
    continuation: str = "",
    tools: list[ToolSpec] | None = None,
) -> list[int]:
    """Token ids exactly as they will be prefilled (chat template with any tools, then any continuation).

    Every engine calls this, so all of them prefill the same ids for one request."""
    if (messages is None) == (prompt is None):
        raise BadRequest("pass exactly one of messages (chat) or prompt (completion)")
    if messages is not None:
        if not messages:
            raise BadRequest("messages is empty")
        text = render_chat(tokenizer, messages, tools) + continuation
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer((prompt or "") + continuation)["input_ids"]
    if not ids:
        raise BadRequest("prompt is empty")
    return list(ids)


def validate(p: SamplingParams) -> None:
    """The contract's one rule for sampling ranges (SamplingParams.problems), as a BadRequest."""
    for problem in p.problems()[:1]:
        raise BadRequest(problem)
