"""Conversations in, tokenized samples out: loss only on assistant tokens, spans taken from the chat template.

Two input formats, as a JSON list or JSON lines: FastChat/ShareGPT (`{"conversations": [{"from":
"human"|"gpt"|"system", "value": ...}], "system"?: ...}`) and OpenAI (`{"messages": [{"role", "content"}]}`).
Parsing is pure Python (the CLI validates before uploading); tokenizing takes any HF tokenizer.

The assistant mask is offset-based and template-agnostic: render the conversation prefix by prefix with
the tokenizer's own chat template; assistant turn i spans from the end of
`render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i+1])` (trailing
whitespace excluded), and a token carries loss when its first character lies in such a span.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from trainer.schemas import DataReport

__all__ = [
    "Conversation",
    "DatasetError",
    "Sample",
    "TemplateError",
    "assistant_spans",
    "batches_per_epoch",
    "micro_batches",
    "normalize",
    "parse_dataset",
    "parse_records",
    "tokenize_conversation",
    "tokenize_dataset",
]

IGNORE = -100
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
MAX_LISTED = 10


class DatasetError(ValueError):
    """The dataset cannot be used; the message lists the bad lines and says what to fix."""


class TemplateError(ValueError):
    """This conversation cannot be masked with this chat template."""


@dataclass(frozen=True)
class Conversation:
    line: int  # 1-based line (JSON lines) or item number (JSON list)
    messages: list[dict[str, str]]  # [{"role": system|user|assistant, "content": str}]


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on every token that is not an assistant token


# ----------------------------------------------------------------------------- parsing (no tokenizer)


def parse_dataset(data: bytes, name: str = "dataset") -> list[Conversation]:
    """Every record of a JSON list or JSON-lines file as role/content messages; DatasetError lists the bad ones."""
    conversations, bad = parse_records(data, name)
    if bad:
        more = f"\n  … and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(
            f"{name}: {len(bad)} malformed record(s); each must be "
            '{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]} or '
            '{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}]}. Fix or remove:\n  '
            + "\n  ".join(bad[:MAX_LISTED])
            + more
        )
    if not conversations:
        raise DatasetError(f"{name} holds no records: expected a JSON list or JSON lines of conversations")
    return conversations


def parse_records(data: bytes, name: str = "dataset") -> tuple[list[Conversation], list[str]]:
    """The good records and a `line N: what is wrong` for each bad one (DatasetError only if unreadable)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{name} is not UTF-8 text ({e}); save it as UTF-8 JSON or JSON lines") from None
    records: list[tuple[int, Any]] = []
    bad: list[str] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{name}: invalid JSON at line {e.lineno}: {e.msg}") from None
        records = list(enumerate(items, 1))
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                bad.append(f"line {number}: invalid JSON ({e.msg})")
    conversations = []
    for number, record in records:
        try:
            conversations.append(Conversation(number, _messages(record)))
        except ValueError as e:
            bad.append(f"line {number}: {e}")
    return conversations, bad


def _messages(record: Any) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    if isinstance(record.get("conversations"), list):
        turns, role_key, text_key = record["conversations"], "from", "value"
    elif isinstance(record.get("messages"), list):
        turns, role_key, text_key = record["messages"], "role", "content"
    else:
        raise ValueError('no "conversations" or "messages" list')
    messages = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append({"role": "system", "content": record["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        role = ROLES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise ValueError(f"turn {i} has unknown {role_key} {turn.get(role_key)!r}")
        messages.append({"role": role, "content": _text(turn.get(text_key), i)})
    return messages


def _text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts:
            return "".join(parts)
    raise ValueError(f"turn {i} has no text content")


def normalize(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Optional system, then user/assistant alternating, ending on assistant (like FastChat's preprocess).

    A leading assistant turn is skipped (ShareGPT dumps often start with one) and a trailing user turn
    is cut; anything else out of order raises ValueError with the reason a sample is dropped.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    if turns and turns[0]["role"] == "assistant":
        turns = turns[1:]
    if turns and turns[-1]["role"] == "user":
        turns = turns[:-1]
    if not any(m["role"] == "assistant" for m in turns):
        raise ValueError("no assistant turn")
    for i, m in enumerate(turns):
        if m["role"] != ("user", "assistant")[i % 2]:
            raise ValueError("roles do not alternate user/assistant")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError("empty assistant turn")
    return system + turns


# ----------------------------------------------------------------------------- tokenizing


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return text if isinstance(text, str) else str(text)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (incl. end-of-turn marker)."""
    try:
        text = _render(tokenizer, messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = _render(tokenizer, messages[:i], True)
            upto = _render(tokenizer, messages[: i + 1], False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise TemplateError("the chat template renders earlier turns differently as it grows")
            spans.append((len(prefix), len(prefix) + len(upto[len(prefix) :].rstrip())))
    except TemplateError:
        raise
    except Exception as e:  # templates raise on shapes they do not support (e.g. no system role)
        raise TemplateError(f"the chat template rejected it ({str(e).splitlines()[0][:120]})") from None
    return text, spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_len: int
) -> tuple[Sample, bool]:
    """One sample and whether it was truncated; ValueError says why it cannot be used."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # the template adds BOS
    ids: list[int] = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    span_iter = iter(spans)
    span = next(span_iter, None)
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        while span is not None and start >= span[1]:
            span = next(span_iter, None)
        if span is not None and span[0] <= start < span[1]:
            labels[t] = ids[t]
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE for label in labels[1:]):
        raise ValueError("no assistant tokens within max_len" if truncated else "no assistant tokens")
    return Sample(ids, labels), truncated


def tokenize_dataset(
    tokenizer: Any, conversations: list[Conversation], max_len: int
) -> tuple[list[Sample], DataReport]:
    """Samples for every usable conversation, and a report of what was dropped or truncated and why."""
    samples: list[Sample] = []
    dropped: Counter[str] = Counter()
    examples: list[str] = []
    truncated = 0
    for conv in conversations:
        try:
            sample, cut = tokenize_conversation(tokenizer, normalize(conv.messages), max_len)
        except ValueError as e:
            reason = str(e).split(" (")[0]
            dropped[reason] += 1
            if len(examples) < MAX_LISTED:
                examples.append(f"line {conv.line}: {e}")
            continue
        samples.append(sample)
        if cut:
            truncated += 1
            if len(examples) < MAX_LISTED:
                examples.append(f"line {conv.line}: truncated to {max_len} tokens")
    report = DataReport(
        total=len(conversations),
        kept=len(samples),
        truncated=truncated,
        dropped=dict(dropped),
        examples=examples,
        tokens=sum(len(s.input_ids) for s in samples),
        assistant_tokens=sum(sum(label != IGNORE for label in s.labels) for s in samples),
    )
    if not samples:
        raise DatasetError(
            f"no usable samples: {report.summary()}; first problems: {'; '.join(examples[:3])}"
        )
    return samples, report


# ----------------------------------------------------------------------------- batches


def micro_batches(samples: list[Sample], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Sample indices, batch after batch, epoch after epoch, forever; the same seed gives the same order.

    Length-grouped: each shuffled window of 16 batches is sorted by length before cutting, so batches
    pad little, then the batches are shuffled again so lengths do not trend within an epoch.
    """
    epoch = 0
    while True:
        rng = random.Random(seed + epoch)
        order = list(range(len(samples)))
        rng.shuffle(order)
        window = batch_size * 16
        batches = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: len(samples[i].input_ids))
            batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        yield from batches
        epoch += 1


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    window = batch_size * 16
    full, rest = divmod(n_samples, window)
    return full * 16 + -(-rest // batch_size)
