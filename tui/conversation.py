"""One chat's state (model, system prompt, sampling parameters, turns) and its JSON file form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bus import ChatMessage, SamplingParams

__all__ = ["FORMAT", "Conversation", "ConversationFileError"]

FORMAT = "chatbus.conversation.v1"


class ConversationFileError(ValueError):
    """A conversation file that cannot be read; the message says which file and why."""


@dataclass
class Conversation:
    model: str = ""
    system: str = ""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = 512
    repetition_penalty: float = 1.0
    messages: list[ChatMessage] = field(default_factory=list)

    # ------------------------------------------------------------------ what is sent

    def params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            repetition_penalty=self.repetition_penalty,
        )

    def request_messages(self) -> list[ChatMessage]:
        system = [ChatMessage(role="system", content=self.system)] if self.system.strip() else []
        return system + self.messages

    # ------------------------------------------------------------------ turns

    def add_user(self, text: str) -> None:
        self.messages.append(ChatMessage(role="user", content=text))

    def add_assistant(self, text: str) -> None:
        self.messages.append(ChatMessage(role="assistant", content=text))

    def drop_answer(self) -> str | None:
        """For !!regen: drop the last answer; the user message it answered, or None if there is none."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1].role == "user":
            return self.messages[-1].content
        return None

    def remove_exchange(self) -> bool:
        """For !!remove: drop the last user message and its answer (if any). False when empty."""
        if not self.messages:
            return False
        if self.messages[-1].role == "assistant":
            self.messages.pop()
        if self.messages and self.messages[-1].role == "user":
            self.messages.pop()
        return True

    def reset(self) -> None:
        self.messages.clear()

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "system": self.system,
            "params": {
                "temperature": self.temperature,
                "top_p": self.top_p,
                "max_tokens": self.max_tokens,
                "repetition_penalty": self.repetition_penalty,
            },
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
        }

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Any, source: str = "conversation") -> Conversation:
        """Our own format, or a bare OpenAI-style list of {role, content} messages."""
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict):
            raise ConversationFileError(f"{source}: expected a JSON object or a list of messages")
        conv = cls()
        params = data.get("params") or {}
        try:
            conv.model = str(data.get("model") or "")
            conv.temperature = float(params.get("temperature", conv.temperature))
            conv.top_p = float(params.get("top_p", conv.top_p))
            max_tokens = params.get("max_tokens", conv.max_tokens)
            conv.max_tokens = None if max_tokens is None else int(max_tokens)
            conv.repetition_penalty = float(params.get("repetition_penalty", conv.repetition_penalty))
            for i, m in enumerate(data.get("messages") or []):
                role, content = m.get("role"), m.get("content")
                if role not in ("system", "user", "assistant") or not isinstance(content, str):
                    raise ConversationFileError(
                        f"{source}: message {i} needs a role of system/user/assistant and a text content"
                    )
                if role == "system":
                    conv.system = content
                else:
                    conv.messages.append(ChatMessage(role=role, content=content))
            if "system" in data:
                conv.system = str(data["system"] or "")
        except (AttributeError, TypeError, ValueError) as e:
            if isinstance(e, ConversationFileError):
                raise
            raise ConversationFileError(f"{source}: not a chatbus conversation ({e})") from e
        problems = conv.params().problems()
        if problems:
            raise ConversationFileError(f"{source}: {'; '.join(problems)}")
        return conv

    @classmethod
    def load(cls, path: Path) -> Conversation:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConversationFileError(f"cannot read {path}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise ConversationFileError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from e
        return cls.from_dict(data, str(path))
