"""OpenAI request bodies as msgspec structs: strict parsing, validation, conversion to bus params.

Unknown fields are rejected (as OpenAI does) and known OpenAI features that no chatbus engine can
honour (functions, audio, ...) get a 400 that names them: never silently ignored. Tools and
response_format are checked in gateway/tools.py.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

import msgspec

from bus import ChatMessage, InvalidName, SamplingParams, ToolCall, check_name
from gateway.errors import ApiError

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "TokenCheckRequest",
    "chat_messages",
    "chat_sampling",
    "completion_prompts",
    "completion_sampling",
    "embedding_inputs",
    "parse",
]

T = TypeVar("T")


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every request body: unknown fields are an error."""


class ContentPart(_Body, kw_only=True):
    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class Message(_Body, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # Present (as null) when an SDK round-trips a response message; rejected when set.
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None
    annotations: Any = None


class StreamOptions(_Body, kw_only=True):
    include_usage: bool = False


class _Generation(_Body, kw_only=True):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension
    n: int = 1
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # extension
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    store: bool | None = None
    metadata: Any = None
    service_tier: str | None = None


class ChatRequest(_Generation, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class CompletionRequest(_Generation, kw_only=True):
    prompt: str | list[str | int | list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class EmbeddingRequest(_Body, kw_only=True):
    model: str
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenCheckItem(_Body, kw_only=True):
    model: str
    prompt: str | None = None
    messages: list[Message] | None = None
    max_tokens: int = 0


class TokenCheckRequest(_Body, kw_only=True):
    """FastChat's /api/v1/token_check body (plus `messages` as an alternative to `prompt`)."""

    prompts: list[TokenCheckItem]


# ----------------------------------------------------------------------------- parsing

_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")


def parse(body: bytes, type_: type[T]) -> T:
    """Decode a JSON body or raise a 400 that names the bad parameter."""
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        value = msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        text = str(e)
        at = _AT.search(text)
        unknown = _UNKNOWN.search(text)
        if unknown:
            where = at.group(1) if at else ""
            name = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
            raise ApiError(
                400,
                f"unrecognized request argument supplied: {name}; see docs/api.md for what chatbus supports",
                code="unknown_parameter",
                param=name,
            ) from None
        raise ApiError(
            400, f"invalid request: {text}", code="invalid_type", param=at.group(1) if at else None
        ) from None
    except msgspec.DecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except UnicodeDecodeError as e:
        raise ApiError(
            400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start})", code="invalid_json"
        ) from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    _check_models(value)
    return value


def _check_models(req: object) -> None:
    """Model names go into subjects: the bus's one rule for names, as a 400 naming the field."""
    items = req.prompts if isinstance(req, TokenCheckRequest) else [req]
    for i, item in enumerate(items):
        param = f"prompts[{i}].model" if isinstance(req, TokenCheckRequest) else "model"
        try:
            check_name(getattr(item, "model", "?"), "model")
        except InvalidName as e:
            raise ApiError(400, e.message, code="invalid_value", param=param) from None


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def _unsupported(param: str, what: str) -> ApiError:
    return _bad(param, f"{param} is not supported by chatbus ({what}); remove it", "unsupported_parameter")


def _check_unsupported(req: ChatRequest | CompletionRequest) -> None:
    if req.store:
        raise _unsupported("store", "completions are not stored")
    if req.service_tier not in (None, "auto", "default"):
        raise _unsupported("service_tier", "there is one tier")
    if req.stream_options is not None and not req.stream:
        raise _bad("stream_options", "stream_options is only allowed when stream is true")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise _unsupported("suffix", "no fill-in-the-middle")
        if req.best_of not in (None, req.n):
            raise _unsupported("best_of", "use n to get several completions")
        if req.echo and req.logprobs is not None:
            raise _unsupported("logprobs with echo", "prompt logprobs are not computed")
        return
    for name in ("functions", "function_call"):
        if getattr(req, name) not in (None, [], "none"):
            raise _unsupported(name, "deprecated; use tools and tool_choice")
    for name in ("audio", "modalities", "prediction", "reasoning_effort", "web_search_options"):
        if getattr(req, name) not in (None, ["text"]):
            raise _unsupported(name, "text generation only")


MAX_LOGIT_BIAS = 1024  # entries


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float]:
    if not raw:
        return {}
    if len(raw) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"at most {MAX_LOGIT_BIAS} logit_bias entries, got {len(raw)}")
    bias = {}
    for key, value in raw.items():
        if not key.isdigit() or int(key) >= 2**31:
            raise _bad("logit_bias", f"logit_bias keys are token ids (non-negative integers), got {key!r}")
        if not -100 <= value <= 100:
            raise _bad("logit_bias", f"logit_bias values must be in [-100, 100], got {value}")
        bias[int(key)] = float(value)
    return bias


def _sampling(
    req: ChatRequest | CompletionRequest, max_tokens: int | None, logprobs: bool, top: int
) -> SamplingParams:
    """The request's sampling, checked by the contract's one range rule (SamplingParams.field_problems);
    only OpenAI's own shapes (n, empty stop strings, logit_bias keys) are checked here."""
    _check_unsupported(req)
    if req.n < 1:
        raise _bad("n", f"n must be >= 1, got {req.n}")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise _bad("stop", "stop strings must not be empty")
    params = SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        max_tokens=max_tokens,
        stop=stop,
        seed=req.seed,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs,
        top_logprobs=top,
        logit_bias=_logit_bias(req.logit_bias),
    )
    for field, problem in params.field_problems()[:1]:
        raise _bad(field, problem)
    return params


def chat_sampling(req: ChatRequest) -> SamplingParams:
    limit = req.max_completion_tokens
    if req.max_tokens is not None:
        if limit is not None and limit != req.max_tokens:
            raise _bad("max_tokens", "max_tokens and max_completion_tokens differ; send only one of them")
        limit = req.max_tokens
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise _bad("top_logprobs", "top_logprobs needs logprobs: true")
    return _sampling(req, limit, bool(req.logprobs), top)


def completion_sampling(req: CompletionRequest) -> SamplingParams:
    # OpenAI's legacy completions default to 16 tokens.
    limit = 16 if req.max_tokens is None else req.max_tokens
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise _bad("logprobs", f"logprobs must be in [0, 20], got {req.logprobs}")
    return _sampling(req, limit, req.logprobs is not None, req.logprobs or 0)


_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _text_of(param: str, m: Message) -> str:
    if m.content is None:
        if m.role == "assistant" and m.tool_calls:
            return ""
        raise _bad(f"{param}.content", "message content is required (but for assistant tool calls)")
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        extra = part.image_url is not None or part.input_audio is not None or part.file is not None
        if part.type != "text" or part.text is None or extra:
            raise _unsupported(f"{param}.content[{j}]", f"content part {part.type!r}: text only")
        texts.append(part.text)
    return "".join(texts)


def _tool_calls(param: str, raw: Any) -> list[ToolCall]:
    if not isinstance(raw, list) or not raw:
        raise _bad(f"{param}.tool_calls", "tool_calls must be a non-empty list")
    calls = []
    for j, call in enumerate(raw):
        where = f"{param}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id"), str)
            or not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not isinstance(fn.get("arguments", ""), str)
        ):
            raise _bad(
                where,
                f'{where} must be {{"id": str, "type": "function", "function": {{"name": str, "arguments": str}}}}',
            )
        calls.append(ToolCall(id=call["id"], name=fn["name"], arguments=fn.get("arguments") or "{}"))
    return calls


def _message(param: str, m: Message) -> ChatMessage:
    role = _ROLES.get(m.role)
    if role is None:
        raise _unsupported(
            f"{param}.role", f"role {m.role!r}; use system, developer, user, assistant or tool"
        )
    for name in ("function_call", "audio"):
        if getattr(m, name):
            raise _unsupported(f"{param}.{name}", "deprecated function calling and audio are not supported")
    if m.tool_calls and role != "assistant":
        raise _bad(f"{param}.tool_calls", "only assistant messages carry tool_calls")
    if role == "tool":
        if not isinstance(m.tool_call_id, str) or not m.tool_call_id:
            raise _bad(f"{param}.tool_call_id", "a tool message needs the tool_call_id it answers")
        return ChatMessage(
            role="tool", content=_text_of(param, m), tool_call_id=m.tool_call_id, name=m.name or ""
        )
    if m.tool_call_id:
        raise _bad(f"{param}.tool_call_id", "only tool messages carry a tool_call_id")
    if m.name:
        raise _unsupported(f"{param}.name", "the chat template has no participant names")
    calls = _tool_calls(param, m.tool_calls) if m.tool_calls else []
    return ChatMessage(role=role, content=_text_of(param, m), tool_calls=calls)  # type: ignore[arg-type]


def chat_messages(messages: list[Message], param: str = "messages") -> list[ChatMessage]:
    if not messages:
        raise _bad(param, "messages must not be empty")
    out = [_message(f"{param}[{i}]", m) for i, m in enumerate(messages)]
    answered = {c.id for m in out for c in m.tool_calls}
    for i, m in enumerate(out):
        if m.role == "tool" and m.tool_call_id not in answered:
            raise _bad(f"{param}[{i}].tool_call_id", f"no assistant tool call has id {m.tool_call_id!r}")
    return out


def _texts(value: str | list[str | int | list[int]], param: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise _bad(param, f"{param} must not be empty")
    if not all(isinstance(v, str) for v in value):
        raise _unsupported(param, "token-id input; send text")
    return list(value)  # type: ignore[arg-type]


def completion_prompts(req: CompletionRequest) -> list[str]:
    return _texts(req.prompt, "prompt")


def embedding_inputs(req: EmbeddingRequest) -> list[str]:
    if req.dimensions is not None:
        raise _unsupported("dimensions", "embeddings have the model's hidden size")
    inputs = _texts(req.input, "input")
    if any(not t for t in inputs):
        raise _bad("input", "input strings must not be empty")
    return inputs
