"""The Engine protocol: what a node needs from a model runtime. No NATS in here.

An engine owns its own worker thread. `submit()` queues a request and returns at once; the
engine calls `sink(delta)` from its worker thread after every decode step that produced text for
that request (at most one delta per request per step), and exactly once with `finish_reason` set.
The bus adapter (node/service.py) bridges those calls onto its event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from bus.schemas import ChatMessage, Constraint, ModelCard, SamplingParams, TokenLogprob, ToolSpec

__all__ = ["Delta", "Engine", "EngineRequest", "EngineStats", "Sink"]

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    messages: list[ChatMessage] | None = None  # chat: rendered with the tokenizer's chat template
    prompt: str | None = None  # raw completion: tokenized as is
    params: SamplingParams = field(default_factory=SamplingParams)
    continuation: str = ""  # assistant text already streamed (failover): appended to the prompt
    constraint: Constraint | None = None  # the output must match it (node/grammar.py)
    tools: list[ToolSpec] = field(default_factory=list)  # given to the chat template
    adapter: str = ""  # the name of a LoRA adapter the engine serves (node/lora.py); "": the base


@dataclass(frozen=True)
class Delta:
    request_id: str
    text: str = ""  # new text since the previous delta (never a partial UTF-8 char or stop prefix)
    tokens: int = 0  # generated tokens this delta covers
    finish_reason: FinishReason | None = None  # set on the last delta only
    prompt_tokens: int = 0
    completion_tokens: int = 0  # running total
    error: str = ""  # with finish_reason "error"
    logprobs: list[TokenLogprob] | None = None
    # Once per request, on its first delta after prefill (engines that measure them; node/metrics.py):
    queue_s: float | None = None  # submit → taken out of the queue to be prefilled
    prefill_s: float | None = None  # taken → prefill done (the first token chosen)


Sink = Callable[[Delta], None]


@dataclass(frozen=True)
class EngineStats:
    running: int
    queued: int
    tokens_per_s: float  # recent decode throughput over all sequences
    # bus.prefix_hashes of the conversations whose KV the engine holds (prompt, and prompt + reply),
    # most recently used first, bounded: what a node advertises for cache-aware routing.
    cached_prefixes: list[int] = field(default_factory=list)
    kv_cache_usage: float = 0.0  # 0..1: the running rows' KV memory over the engine's budget
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (a running total)
    prefix_cache_hits: int = 0  # of those, tokens found there


class Engine(Protocol):
    @property
    def card(self) -> ModelCard: ...

    @property
    def device(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def max_running(self) -> int: ...

    def start(self) -> None:
        """Start the worker thread (model already loaded)."""

    def stop(self) -> None:
        """Finish every request with finish_reason 'cancelled' and join the worker."""

    def count_tokens(self, messages: list[ChatMessage] | None, prompt: str | None) -> int:
        """Prompt tokens as `submit` would feed them (chat template applied)."""
        ...

    def submit(self, request: EngineRequest, sink: Sink) -> int:
        """Queue a request; returns its prompt token count.

        Raises bus.errors.ContextLengthExceeded (with the numbers) or bus.errors.BadRequest at once,
        from the caller's thread, for what can be checked before generating.
        """
        ...

    def cancel(self, request_id: str) -> None:
        """Stop a request before the next decode step; its sink gets finish_reason 'cancelled'."""

    def stats(self) -> EngineStats: ...

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Normalised mean-pooled embeddings in one batch, and the prompt tokens used."""
        ...
