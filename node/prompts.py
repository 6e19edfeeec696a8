"""Request → prompt token ids: the tokenizer's chat template (or a plain one), checks on the parameters."""

from __future__ import annotations

from typing import Any

from bus.errors import BadRequest
from bus.schemas import ChatMessage, SamplingParams

__all__ = ["encode", "render", "validate"]


def encode(
    tokenizer: Any, messages: list[ChatMessage] | None, prompt: str | None, continuation: str
) -> list[int]:
    """Token ids exactly as they will be prefilled (chat template, then any continuation)."""
    if (messages is None) == (prompt is None):
        raise BadRequest("pass exactly one of messages (chat) or prompt (completion)")
    if messages is not None:
        if not messages:
            raise BadRequest("messages is empty")
        text = render(tokenizer, messages) + continuation
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer((prompt or "") + continuation)["input_ids"]
    if not ids:
        raise BadRequest("prompt is empty")
    return list(ids)


def render(tokenizer: Any, messages: list[ChatMessage]) -> str:
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
    # The model has no template (DESIGN: only then a plain one).
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "


def validate(p: SamplingParams) -> None:
    problems = [
        (p.temperature < 0, "temperature must be >= 0"),
        (not 0 < p.top_p <= 1, "top_p must be in (0, 1]"),
        (p.top_k < 0, "top_k must be >= 0"),
        (p.max_tokens is not None and p.max_tokens < 1, "max_tokens must be >= 1"),
        (p.repetition_penalty <= 0, "repetition_penalty must be > 0"),
        (not 0 <= p.top_logprobs <= 20, "top_logprobs must be in [0, 20]"),
    ]
    for bad, message in problems:
        if bad:
            raise BadRequest(message)
