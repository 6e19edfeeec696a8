"""Bus events → OpenAI JSON objects (chat and legacy completions, streamed and whole)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bus import TokenLogprob
from bus import ToolCallOutput as Output
from bus import ToolCallParser as CallParser
from bus import parse_tool_calls as parse_all

__all__ = ["Choice", "Shape", "chat_shape", "completion_shape", "usage_json"]


@dataclass
class Choice:
    """One answer being built: its index, what was said so far, how it ended."""

    index: int
    prefix: str = ""  # echo: the prompt, shown before the answer
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    seq: int = 0  # the last bus event folded in (the SSE event id says it)
    calls: CallParser | None = None  # tools were offered: tool calls are parsed out of the text

    def final_reason(self) -> str | None:
        """OpenAI's finish_reason: "tool_calls" when the answer ended after calling tools."""
        if self.calls is not None and self.calls.count and self.finish_reason == "stop":
            return "tool_calls"
        return self.finish_reason


def usage_json(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = [
        {**one(t.token, t.logprob), "top_logprobs": [one(x.token, x.logprob) for x in t.top]} for t in items
    ]
    return {"content": content, "refusal": None}


def _tool_calls(out: Output, streamed: bool) -> list[dict[str, Any]]:
    calls = []
    for call in out.calls:
        function: dict[str, str] = {"arguments": call.arguments}
        item: dict[str, Any] = {"index": call.index} if streamed else {}
        if call.id:
            item.update(id=call.id, type="function")
            function["name"] = call.name
        item["function"] = function
        calls.append(item)
    return calls


def _parsed_delta(out: Output) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if out.content:
        delta["content"] = out.content
    if out.calls:
        delta["tool_calls"] = _tool_calls(out, streamed=True)
    return delta


def _completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{x.token: x.logprob for x in t.top} for t in items],
        "text_offset": offsets,
    }


@dataclass(frozen=True)
class Shape:
    """How one endpoint words its objects; `chat` picks between the two OpenAI dialects."""

    chat: bool
    id: str
    model: str
    created: int
    logprobs: bool

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    # ------------------------------------------------------------------ streaming

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = choices
        if usage is not None:
            body["usage"] = usage
        return body

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        """The first chunk of a choice: the role (chat) or the echoed prompt (completions)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""}
            return {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": None}
        if choice.prefix:
            return {"index": choice.index, "text": choice.prefix, "logprobs": None, "finish_reason": None}
        return None

    def delta(self, choice: Choice, text: str, logprobs: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """The chunk choice for new text; None when nothing is final yet (a tool call being parsed)."""
        lp: dict[str, Any] | None = None
        if self.logprobs and logprobs:
            if self.chat:
                lp = _chat_logprobs(logprobs)
            else:
                done = len(choice.prefix) + sum(map(len, choice.text)) - len(text)
                lp = _completion_logprobs(logprobs, done)
        if self.chat and choice.calls is not None:
            delta = _parsed_delta(choice.calls.feed(text))
            if not delta and lp is None:
                return None
            return {"index": choice.index, "delta": delta, "logprobs": lp, "finish_reason": None}
        if self.chat:
            return {"index": choice.index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}
        return {"index": choice.index, "text": text, "logprobs": lp, "finish_reason": None}

    def closing(self, choice: Choice) -> dict[str, Any]:
        if self.chat:
            delta = _parsed_delta(choice.calls.flush()) if choice.calls is not None else {}
            return {
                "index": choice.index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": choice.final_reason(),
            }
        return {"index": choice.index, "text": "", "logprobs": None, "finish_reason": choice.finish_reason}

    # ------------------------------------------------------------------ whole answers

    def whole(self, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
        body = self._head("chat.completion" if self.chat else "text_completion")
        body["choices"] = [self._whole_choice(c) for c in choices]
        body["usage"] = usage
        return body

    def _whole_choice(self, c: Choice) -> dict[str, Any]:
        text = "".join(c.text)
        if self.chat:
            lp = _chat_logprobs(c.logprobs) if self.logprobs else None
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if c.calls is not None:
                out = parse_all(text)  # the same parser the stream uses, fed once
                message["content"] = out.content or None
                if out.calls:
                    message["tool_calls"] = _tool_calls(out, streamed=False)
                c.calls.count = len(out.calls)
            return {"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.final_reason()}
        lp = _completion_logprobs(c.logprobs, len(c.prefix)) if self.logprobs else None
        return {"index": c.index, "text": c.prefix + text, "logprobs": lp, "finish_reason": c.finish_reason}


def chat_shape(request_id: str, model: str, created: int, logprobs: bool) -> Shape:
    return Shape(True, f"chatcmpl-{request_id}", model, created, logprobs)


def completion_shape(request_id: str, model: str, created: int, logprobs: bool) -> Shape:
    return Shape(False, f"cmpl-{request_id}", model, created, logprobs)
