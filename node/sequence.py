"""One request's life inside HFEngine: its prompt, sampling state, text stream and what is unsent."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from bus.schemas import ChatMessage, TokenLogprob
from node.engine import EngineRequest, FinishReason, Sink
from node.lora import Adapter
from node.prefix_cache import KV
from node.sampling import TokenChooser
from node.slotbatch import Batch
from node.textstream import TextStream

__all__ = ["Seq"]


@dataclass(eq=False)
class Seq:
    """One request's life inside the engine."""

    request: EngineRequest
    sink: Sink
    prompt: list[int]
    max_new: int
    chooser: TokenChooser
    stream: TextStream
    reserve: int  # KV columns it may reach: prompt + max_new
    kv: Batch | None = None  # its own cache while a long prompt is prefilled chunk by chunk
    prefix: KV | None = None  # cached keys/values of prompt[:cached]
    cached: int = 0
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    reason: FinishReason | None = None
    next_token: int = -1
    completion: int = 0
    unsent_tokens: int = 0
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    adapter: Adapter | None = None  # its LoRA (node/lora.py), held until it finishes; None: the base
    submitted: float = field(default_factory=time.monotonic)
    taken: float | None = None  # out of the queue, its prefill begins
    prefill_s: float | None = None  # set when its first token is chosen; reported once
    timed: bool = False  # queue_s / prefill_s went out on a delta

    def reply(self) -> ChatMessage:
        """What the client got, as the assistant message of its next turn."""
        return ChatMessage(role="assistant", content=self.stream.text)

    def counts(self) -> dict[str, Any]:
        """Delta fields for what was generated since the last delta (and mark it sent)."""
        counts: dict[str, Any] = {
            "tokens": self.unsent_tokens,
            "prompt_tokens": len(self.prompt),
            "completion_tokens": self.completion,
            "logprobs": self.unsent_logprobs or None,
        }
        self.unsent_tokens, self.unsent_logprobs = 0, []
        if self.prefill_s is not None and self.taken is not None and not self.timed:
            counts["queue_s"], counts["prefill_s"] = self.taken - self.submitted, self.prefill_s
            self.timed = True
        return counts

    def take(self) -> None:
        """It leaves the queue: its prefill starts now."""
        self.taken = time.monotonic()

    def prefilled_now(self) -> None:
        """Its first token is chosen: the prefill is over."""
        if self.taken is not None and self.prefill_s is None:
            self.prefill_s = time.monotonic() - self.taken
