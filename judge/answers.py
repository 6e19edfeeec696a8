"""Answer generation: every model answers every question turn by turn through the bus, resumably."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bus import BusClient, ChatMessage, SamplingParams
from judge.backends import JudgeFailure, ask_bus
from judge.questions import Question
from judge.store import RecordStore

__all__ = ["TEMPERATURE_BY_CATEGORY", "answer_key", "answer_record", "answer_turns", "generate_answers"]

# FastChat's sampling temperature per MT-bench category (others: 0.7).
TEMPERATURE_BY_CATEGORY = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}


def answer_key(record: dict[str, Any]) -> tuple[str, str]:
    return (str(record["question_id"]), record["model_id"])


def answer_record(question: Question, model: str, turns: list[str]) -> dict[str, Any]:
    """FastChat's model_answer layout."""
    return {
        "question_id": question.question_id,
        "answer_id": uuid.uuid4().hex,
        "model_id": model,
        "choices": [{"index": 0, "turns": turns}],
        "tstamp": time.time(),
    }


def answer_turns(record: dict[str, Any]) -> list[str]:
    return list(record["choices"][0]["turns"])


async def answer_question(
    client: BusClient, model: str, question: Question, params: SamplingParams, timeout_s: float
) -> list[str]:
    """A multi-turn conversation: each user turn sees the model's own earlier answers."""
    messages: list[ChatMessage] = []
    turns: list[str] = []
    for text in question.turns:
        messages.append(ChatMessage(role="user", content=text))
        answer = await ask_bus(client, model, messages, params, timeout_s)
        turns.append(answer.strip())
        messages.append(ChatMessage(role="assistant", content=answer))
    return turns


async def generate_answers(
    client: BusClient,
    store: RecordStore,
    models: list[str],
    questions: list[Question],
    *,
    max_tokens: int,
    temperature: float | None,
    timeout_s: float,
    run: Callable[[list[Callable[[], Awaitable[None]]]], Awaitable[None]],
    on_answer: Callable[[str | None], Awaitable[None]],
) -> tuple[int, dict[str, int]]:
    """Answer what the store lacks; returns (generated, failures by kind). `run` runs the thunks
    concurrently; `on_answer(None)` reports a stored answer, `on_answer(kind)` a failure."""
    generated = 0
    failures: dict[str, int] = {}

    def task(model: str, q: Question) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            nonlocal generated
            temp = temperature if temperature is not None else TEMPERATURE_BY_CATEGORY.get(q.category, 0.7)
            params = SamplingParams(temperature=temp, max_tokens=max_tokens)
            try:
                turns = await answer_question(client, model, q, params, timeout_s)
            except JudgeFailure as e:
                failures[e.kind] = failures.get(e.kind, 0) + 1
                await on_answer(e.kind)
                return
            await store.add(answer_record(q, model, turns))
            generated += 1
            await on_answer(None)

        return go

    todo = [task(m, q) for q in questions for m in models if store.get((str(q.question_id), m)) is None]
    await run(todo)
    return generated, failures
