"""Prompts → token ids with the tokenizer's own chat template, the same way for every engine.

The torch engine (node/hf.py) renders and tokenizes the same way; engines that decode elsewhere
(node/llamacpp.py) call these so both prefill exactly the same ids for one request.
"""

from __future__ import annotations

from typing import Any

from bus.errors import BadRequest
from bus.schemas import ChatMessage

__all__ = ["encode_prompt", "render_chat"]


def render_chat(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The chat template with the generation prompt; a plain `role: content` form only without one."""
    turns = [{"role": m.role, "content": m.content} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "


def encode_prompt(
    tokenizer: Any, messages: list[ChatMessage] | None, prompt: str | None, continuation: str = ""
) -> list[int]:
    """Token ids exactly as they are prefilled (chat template, then any continuation)."""
    if (messages is None) == (prompt is None):
        raise BadRequest("pass exactly one of messages (chat) or prompt (completion)")
    if messages is not None:
        if not messages:
            raise BadRequest("messages is empty")
        ids = tokenizer(render_chat(tokenizer, messages) + continuation, add_special_tokens=False)[
            "input_ids"
        ]
    else:
        ids = tokenizer((prompt or "") + continuation)["input_ids"]
    if not ids:
        raise BadRequest("prompt is empty")
    return list(ids)
