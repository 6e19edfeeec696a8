"""Every message that crosses the bus, as versioned msgspec structs.

Rules (docs/architecture.md): add fields only with defaults; a breaking change bumps `v` and the tag;
tests/test_wire.py decodes frozen v1 samples so nobody breaks the wire by accident.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

__all__ = [
    "CONSTRAINT_VERSION",
    "MAX_STOP_STRINGS",
    "MAX_TOP_LOGPROBS",
    "PENALTY_RANGE",
    "SEED_RANGE",
    "TEMPERATURE_RANGE",
    "WIRE_VERSION",
    "Accepted",
    "Cancel",
    "ChatMessage",
    "Chunk",
    "Constraint",
    "CountReply",
    "CountRequest",
    "Done",
    "EmbedReply",
    "EmbedRequest",
    "Failed",
    "GenerateReply",
    "GenerateRequest",
    "KeepAlive",
    "ModelCard",
    "NodeInfo",
    "Probe",
    "ProbeReply",
    "PromptBody",
    "PromptRef",
    "Rejected",
    "SamplingParams",
    "StreamEvent",
    "TokenLogprob",
    "ToolCall",
    "ToolSpec",
    "TopLogprob",
    "Usage",
]


class _Wire(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every message: frozen, keyword-only, compact on the wire."""


WIRE_VERSION = 1  # the newest message version this release speaks; bus/codec.py rejects newer ones


class _Tagged(_Wire, frozen=True, kw_only=True, tag_field="type"):
    v: int = WIRE_VERSION


# ----------------------------------------------------------------------------- generation


class ToolCall(_Wire, frozen=True, kw_only=True):
    """A call an assistant message made: `arguments` is the JSON text as the model wrote it."""

    id: str
    name: str
    arguments: str = "{}"


class ChatMessage(_Wire, frozen=True, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)  # assistant turns that called tools
    tool_call_id: str = ""  # a tool turn: the call it answers
    name: str = ""  # a tool turn: the function's name


class ToolSpec(_Wire, frozen=True, kw_only=True):
    """A function the model may call, shown to it through the chat template's `tools`."""

    name: str
    description: str = ""
    parameters: str = ""  # its JSON Schema, as JSON text ("" = no parameters)


CONSTRAINT_VERSION = 1  # the newest Constraint.v a node of this release honours


class Constraint(_Wire, frozen=True, kw_only=True):
    """What the generated text must match, enforced token by token (bus/constraints.py compiles it).

    `kind` is "json_schema" (text: the schema as JSON), "regex" or "lark" (an llguidance Lark
    grammar, which may embed `%json {...}`). A node that does not know `kind` or `v` rejects the
    request with code "unsupported" rather than generate unconstrained text.
    """

    v: int = 1
    kind: str
    text: str


MAX_STOP_STRINGS = 32  # a node rejects more (each one is searched for after every decode step)
TEMPERATURE_RANGE = (0.0, 2.0)  # OpenAI's range; above 2 a small model only babbles
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty, as OpenAI
MAX_TOP_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's: a signed 64-bit integer


class SamplingParams(_Wire, frozen=True, kw_only=True):
    """What shapes one generation. temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None  # None: up to the context length
    stop: list[str] = msgspec.field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)  # token id → added to its logit

    def problems(self) -> list[str]:
        """What is out of range, one sentence per field naming the allowed range; empty when valid.

        The one rule for sampling ranges: every client checks it before sending, nodes before decoding.
        """
        return [sentence for _, sentence in self.field_problems()]

    def field_problems(self) -> list[tuple[str, str]]:
        """`problems()` with the field each one is about (the gateway names it as OpenAI's `param`)."""
        t_low, t_high = TEMPERATURE_RANGE
        p_low, p_high = PENALTY_RANGE
        checks = [
            ("temperature", t_low <= self.temperature <= t_high, f"between {t_low:g} (greedy) and {t_high:g}"),
            ("top_p", 0 < self.top_p <= 1, "above 0 and at most 1"),
            ("top_k", self.top_k >= 0, "at least 0 (0 turns it off)"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "at least 1 (unset: up to the context)"),
            ("seed", self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1], "a signed 64-bit integer, as OpenAI"),
            ("repetition_penalty", 0 < self.repetition_penalty < math.inf, "above 0 (1 turns it off)"),
            ("presence_penalty", p_low <= self.presence_penalty <= p_high, f"between {p_low:g} and {p_high:g}"),
            ("frequency_penalty", p_low <= self.frequency_penalty <= p_high, f"between {p_low:g} and {p_high:g}"),
            ("top_logprobs", 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, f"between 0 and {MAX_TOP_LOGPROBS}"),
        ]  # fmt: skip
        out = [
            (name, f"{name} must be {allowed}, got {getattr(self, name)}")
            for name, ok, allowed in checks
            if not ok
        ]
        if len(self.stop) > MAX_STOP_STRINGS:
            out.append(("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"))
        return out


class PromptRef(_Wire, frozen=True, kw_only=True):
    """Where the large part of a request waits when it is too big for one NATS message (bus/prompts.py):
    `chunks` messages in the prompts stream under the asker's `cb.prompt.<owner>.<name>.<i>`,
    encrypted with `key` (hex), which only this request carries; `sha256` is of the plain body."""

    name: str
    chunks: int
    size: int
    sha256: str
    key: str


class PromptBody(_Tagged, frozen=True, kw_only=True, tag="gen.body"):
    """The parts of a `GenerateRequest` that travel by reference: what makes a request large."""

    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    tools: list[ToolSpec] = msgspec.field(default_factory=list)
    constraint: Constraint | None = None


class GenerateRequest(_Tagged, frozen=True, kw_only=True, tag="gen.request"):
    """Ask a node to generate. Exactly one of `messages` (chat) or `prompt` (raw completion).

    `continuation` is assistant text already produced elsewhere (failover): the node appends it
    to the prompt and streams only what comes after it.
    """

    request_id: str
    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    continuation: str = ""
    deadline_s: float = 600.0  # wall-clock budget on the node, from acceptance
    keepalive_s: float = 30.0  # node cancels if the client is silent this long
    client: str = ""
    owner: str = ""  # the asker's NATS user: tokens go to cb.tok.<owner>.<request_id> ("" = anonymous)
    trace_id: str = ""  # the HTTP client's X-Request-ID, for the node's logs
    constraint: Constraint | None = None  # constrained decoding (structured outputs, forced tool calls)
    tools: list[ToolSpec] = msgspec.field(default_factory=list)  # rendered by the chat template
    # Set instead of messages, prompt, tools and constraint when they are too large for one message.
    prompt_ref: PromptRef | None = None


class Accepted(_Tagged, frozen=True, kw_only=True, tag="gen.accepted"):
    request_id: str
    node_id: str
    prompt_tokens: int = 0


class Rejected(_Tagged, frozen=True, kw_only=True, tag="gen.rejected"):
    """Why a node will not take a request. `code` is an errors.Code value."""

    request_id: str
    node_id: str
    code: str
    message: str
    retry_after_s: float = 0.0


GenerateReply = Accepted | Rejected


class TopLogprob(_Wire, frozen=True, kw_only=True):
    token: str
    logprob: float


class TokenLogprob(_Wire, frozen=True, kw_only=True):
    token: str
    logprob: float
    top: list[TopLogprob] = msgspec.field(default_factory=list)


class Usage(_Wire, frozen=True, kw_only=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Chunk(_Tagged, frozen=True, kw_only=True, tag="tok.chunk"):
    """Text produced since the previous chunk (one decode step or a few ms of them)."""

    seq: int
    text: str
    tokens: int = 0
    node_id: str = ""
    logprobs: list[TokenLogprob] | None = None


class Done(_Tagged, frozen=True, kw_only=True, tag="tok.done"):
    seq: int
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage = msgspec.field(default_factory=Usage)
    node_id: str = ""


class Failed(_Tagged, frozen=True, kw_only=True, tag="tok.failed"):
    seq: int
    code: str
    message: str
    node_id: str = ""


StreamEvent = Chunk | Done | Failed


class Cancel(_Tagged, frozen=True, kw_only=True, tag="ctl.cancel"):
    request_id: str


class KeepAlive(_Tagged, frozen=True, kw_only=True, tag="ctl.keepalive"):
    request_ids: list[str]


class Probe(_Tagged, frozen=True, kw_only=True, tag="ctl.probe"):
    """A core request on a node's control subject, answered from its event loop (not its engine):
    no responders means its process is gone, no answer that it hangs, `ProbeReply` that it is slow."""

    request_ids: list[str]


class ProbeReply(_Tagged, frozen=True, kw_only=True, tag="ctl.probe_reply"):
    node_id: str
    running: list[str]  # those of the asked requests the node is still working on


ControlMessage = Cancel | KeepAlive | Probe


# ----------------------------------------------------------------------------- utilities


class CountRequest(_Tagged, frozen=True, kw_only=True, tag="count.request"):
    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None


class CountReply(_Tagged, frozen=True, kw_only=True, tag="count.reply"):
    tokens: int
    context_length: int


class EmbedRequest(_Tagged, frozen=True, kw_only=True, tag="embed.request"):
    model: str
    inputs: list[str]


class EmbedReply(_Tagged, frozen=True, kw_only=True, tag="embed.reply"):
    embeddings: list[list[float]]
    prompt_tokens: int = 0


# ----------------------------------------------------------------------------- liveness


class ModelCard(_Wire, frozen=True, kw_only=True):
    name: str
    context_length: int
    can_embed: bool = False
    base: str = ""  # the base model of an adapter, else empty


class NodeInfo(_Tagged, frozen=True, kw_only=True, tag="node.info"):
    """A node's heartbeat, re-put into the `cb_nodes` KV bucket every few seconds."""

    node_id: str
    host: str
    pid: int
    models: list[ModelCard]
    device: str
    dtype: str
    capacity: int
    running: int = 0
    queued: int = 0
    tokens_per_s: float = 0.0
    started_at: float = 0.0
    updated_at: float = 0.0
    answers_probes: bool = False  # a probe it leaves unanswered means it hangs (older nodes: nothing)
    # bus.prefix_hashes of conversations whose KV cache the node holds (cache-aware routing)
    cached_prefixes: list[int] = msgspec.field(default_factory=list)

    @property
    def load(self) -> float:
        """Fraction of capacity in use (can exceed 1 with a queue)."""
        return (self.running + self.queued) / max(1, self.capacity)
