"""One streamed answer: limits, the bus stream, stop, and its record in the durable log.

UI-free on purpose: pages hand in an `on_text` callback and get an `AnswerResult` back.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from bus import BusError, ChatLog, ChatMessage, ChatStream, Chunk, Done, Failed, SamplingParams, Usage
from bus import LogMode as Mode
from bus import readable_tool_calls as readable
from webui.services import Services

__all__ = ["Answer", "AnswerResult", "new_id"]

IDENTITY_WORDS = (
    "openai", "chatgpt", "gpt-4", "anthropic", "claude", "google", "gemini", "bard", "llama", "meta ai",
    "mistral", "qwen", "alibaba", "deepseek", "vicuna", "lmsys", "smollm", "hugging face", "huggingface",
)  # fmt: skip


def new_id() -> str:
    return uuid.uuid4().hex


def reveals_identity(answers: list[str], models: list[str]) -> bool:
    """Does any answer name a model (a battle's or a well-known family)? Such battles aren't rated."""
    text = " ".join(answers).lower()
    names = {m.lower() for m in models} | {m.lower().rsplit("/", 1)[-1] for m in models}
    return any(w in text for w in (*IDENTITY_WORDS, *names) if len(w) >= 3)


@dataclass
class AnswerResult:
    text: str = ""
    finish_reason: str = "stop"  # stop | length | cancelled | error
    error: str = ""
    usage: Usage = field(default_factory=Usage)
    node_id: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class Answer:
    """Stream `messages` to `model`; `stop()` cancels on the node and keeps the text so far."""

    def __init__(
        self,
        services: Services,
        *,
        model: str,
        messages: list[ChatMessage],
        params: SamplingParams,
        user: str,
        conv_id: str,
        mode: Mode = "chat",
        battle_id: str = "",
        min_update_s: float = 0.05,
    ) -> None:
        self._s = services
        self.model = model
        self.messages = messages
        self.params = params
        self.user = user
        self.conv_id = conv_id
        self.mode = mode
        self.battle_id = battle_id
        self._min_update_s = min_update_s
        self._stream: ChatStream | None = None
        self._stopped = False

    async def stop(self) -> None:
        self._stopped = True
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.cancel()

    async def run(self, on_text: Callable[[str], None]) -> AnswerResult:
        """Stream the answer; `on_text` gets it for display (JSON and tool calls made readable)."""
        start = time.time()
        result = AnswerResult()
        stream = self._stream = self._s.client.chat(self.model, self.messages, self.params)
        last_update = 0.0
        try:
            await stream.start()
            if self._stopped:
                await stream.cancel()
            async for ev in stream:
                if isinstance(ev, Chunk):
                    result.text += ev.text
                    if time.monotonic() - last_update >= self._min_update_s:
                        last_update = time.monotonic()
                        on_text(readable(result.text))
                elif isinstance(ev, Done):
                    result.finish_reason, result.usage = ev.finish_reason, ev.usage
                elif isinstance(ev, Failed):
                    result.finish_reason, result.error = "error", f"{ev.message} ({ev.code})"
        except BusError as e:
            result.finish_reason, result.error = "error", str(e)
        finally:
            result.node_id = stream.node_id
            await stream.aclose()
        on_text(readable(result.text))
        await self._log(result, start)
        return result

    async def _log(self, result: AnswerResult, start: float) -> None:
        await self._s.logs.append(
            ChatLog(
                conv_id=self.conv_id,
                model=self.model,
                messages=[*self.messages, ChatMessage(role="assistant", content=result.text)],
                params=self.params,
                start=start,
                finish=time.time(),
                finish_reason=result.finish_reason,
                error=result.error,
                usage=result.usage,
                node_id=result.node_id,
                mode=self.mode,
                user=self.user,
                battle_id=self.battle_id,
            )
        )
