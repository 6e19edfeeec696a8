"""Judging: single-answer grading and pairwise games with position swap, stored as FastChat judgments."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from judge.backends import JudgeBackend, JudgeFailure
from judge.prompts import JudgePrompt, pick_prompt
from judge.questions import Question
from judge.store import RecordStore
from judge.verdicts import Unparseable, pair_winner, parse_choice, parse_rating

__all__ = [
    "FINAL_ERRORS",
    "Judging",
    "pairwise_key",
    "run_bounded",
    "single_key",
]

Thunk = Callable[[], Awaitable[None]]
Answers = dict[tuple[str, str], list[str]]  # (question_id, model) -> turns

# A stored judgment with one of these is final (the judge spoke); other failures are retried on resume.
FINAL_ERRORS = frozenset({"unparseable"})


def single_key(r: dict[str, Any]) -> tuple[str, str, int]:
    return (str(r["question_id"]), r["model"], int(r["turn"]))


def pairwise_key(r: dict[str, Any]) -> tuple[str, str, str, int]:
    return (str(r["question_id"]), r["model_1"], r["model_2"], int(r["turn"]))


async def run_bounded(
    thunks: Sequence[Thunk],
    limit: int,
    stop: Sequence[asyncio.Event] = (),
    check: Callable[[], None] = lambda: None,
) -> None:
    """Run `thunks` at most `limit` at a time; the first error (or a stop event, via `check`) cancels the rest."""
    if not thunks:
        return
    sem = asyncio.Semaphore(limit)

    async def one(thunk: Thunk) -> None:
        async with sem:
            check()
            await thunk()

    tasks = [asyncio.create_task(one(t)) for t in thunks]
    waiters = [asyncio.create_task(e.wait()) for e in stop]
    try:
        pending: set[asyncio.Task[Any]] = set(tasks)
        while pending:
            done, _ = await asyncio.wait([*pending, *waiters], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t in waiters:
                    check()  # raises when a stop event is set
                elif t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            pending -= done
    finally:
        for t in [*tasks, *waiters]:
            t.cancel()
        await asyncio.gather(*tasks, *waiters, return_exceptions=True)


def _judged_turns(q: Question) -> list[int]:
    return [1, 2][: len(q.turns)]


def _ref(q: Question, turn: int) -> str:
    return q.reference[turn - 1] if q.reference and len(q.reference) >= turn else ""


@dataclass
class Judging:
    """One job's judging step. `on_judgment(kind)` reports each finished judgment (None when usable)."""

    judge: JudgeBackend
    prompts: dict[str, JudgePrompt]
    store: RecordStore
    questions: list[Question]
    answers: Answers
    on_judgment: Callable[[str | None], Awaitable[None]]
    made: int = 0
    no_answer: int = 0
    resumed: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def _prompt(self, kind: str, q: Question, turn: int) -> JudgePrompt:
        use_ref = q.needs_reference and q.reference is not None
        return pick_prompt(self.prompts, kind, turn > 1, use_ref)  # type: ignore[arg-type]

    def _done(self, key: tuple[Any, ...]) -> bool:
        r = self.store.get(key)
        return r is not None and r.get("error", "") in ("", *FINAL_ERRORS)

    def _thunks(self, keys: list[tuple[Any, ...]], make: Callable[..., Thunk]) -> list[Thunk]:
        todo = []
        for key in keys:
            if self._done(key):
                self.resumed += 1
            else:
                todo.append(make(*key))
        return todo

    # ------------------------------------------------------------------ single

    def single_keys(self, models: list[str]) -> list[tuple[str, str, int]]:
        return [(str(q.question_id), m, t) for q in self.questions for m in models for t in _judged_turns(q)]

    def single_thunks(self, models: list[str]) -> list[Thunk]:
        return self._thunks(self.single_keys(models), self._single)

    def _single(self, qid: str, model: str, turn: int) -> Thunk:
        async def go() -> None:
            q = self._question(qid)
            turns = self.answers.get((qid, model))
            if turns is None or len(turns) < turn:
                await self._no_answer()
                return
            prompt = self._prompt("single", q, turn)
            fields = {
                "question": q.turns[0],
                "answer": turns[0],
                "question_1": q.turns[0],
                "answer_1": turns[0],
                "question_2": q.turns[1] if len(q.turns) > 1 else "",
                "answer_2": turns[1] if len(turns) > 1 else "",
                "ref_answer_1": _ref(q, 1),
                "ref_answer_2": _ref(q, 2),
            }
            system, user = prompt.render(**fields)
            record: dict[str, Any] = {
                "question_id": q.question_id,
                "model": model,
                "judge": [self.judge.name, prompt.name],
                "user_prompt": user,
                "judgment": "",
                "score": -1,
                "turn": turn,
                "tstamp": time.time(),
                "category": q.category,
            }
            kind = None
            try:
                record["judgment"] = await self.judge.ask(system, user, "rating")
                record["score"] = parse_rating(record["judgment"])
            except (JudgeFailure, Unparseable) as e:
                kind = e.kind if isinstance(e, JudgeFailure) else "unparseable"
                record.update(error=kind, error_message=str(e))
            await self._finish(record, kind)

        return go

    # ------------------------------------------------------------------ pairwise

    def pairwise_keys(self, pairs: list[tuple[str, str]]) -> list[tuple[str, str, str, int]]:
        return [
            (str(q.question_id), a, b, t) for q in self.questions for a, b in pairs for t in _judged_turns(q)
        ]

    def pairwise_thunks(self, pairs: list[tuple[str, str]]) -> list[Thunk]:
        return self._thunks(self.pairwise_keys(pairs), self._pair)

    def _pair(self, qid: str, m1: str, m2: str, turn: int) -> Thunk:
        async def go() -> None:
            q = self._question(qid)
            t1, t2 = self.answers.get((qid, m1)), self.answers.get((qid, m2))
            if t1 is None or t2 is None or len(t1) < turn or len(t2) < turn:
                await self._no_answer()
                return
            prompt = self._prompt("pairwise", q, turn)
            record: dict[str, Any] = {
                "question_id": q.question_id,
                "model_1": m1,
                "model_2": m2,
                "judge": [self.judge.name, prompt.name],
                "turn": turn,
                "tstamp": time.time(),
                "category": q.category,
            }
            kind = None
            for game, (a, b) in (("g1", (t1, t2)), ("g2", (t2, t1))):
                system, user = prompt.render(**self._pair_fields(q, a, b))
                record[f"{game}_user_prompt"], record[f"{game}_judgment"] = user, ""
                try:
                    record[f"{game}_judgment"] = await self.judge.ask(system, user, "choice")
                    choice = parse_choice(record[f"{game}_judgment"])
                    record[f"{game}_winner"] = pair_winner(choice, swapped=game == "g2")
                except (JudgeFailure, Unparseable) as e:
                    record[f"{game}_winner"] = "error"
                    if kind is None:
                        kind = e.kind if isinstance(e, JudgeFailure) else "unparseable"
                        record.update(error=kind, error_message=f"{game}: {e}")
            await self._finish(record, kind)

        return go

    @staticmethod
    def _pair_fields(q: Question, a: list[str], b: list[str]) -> dict[str, str]:
        return {
            "question": q.turns[0],
            "question_1": q.turns[0],
            "question_2": q.turns[1] if len(q.turns) > 1 else "",
            "answer_a": a[0],
            "answer_b": b[0],
            "answer_a_1": a[0],
            "answer_b_1": b[0],
            "answer_a_2": a[1] if len(a) > 1 else "",
            "answer_b_2": b[1] if len(b) > 1 else "",
            "ref_answer_1": _ref(q, 1),
            "ref_answer_2": _ref(q, 2),
        }

    # ------------------------------------------------------------------ shared

    def _question(self, qid: str) -> Question:
        return next(q for q in self.questions if str(q.question_id) == qid)

    async def _no_answer(self) -> None:
        self.no_answer += 1
        await self.on_judgment("no_answer")

    async def _finish(self, record: dict[str, Any], kind: str | None) -> None:
        await self.store.add(record)
        self.made += 1
        if kind is not None:
            self.failures[kind] = self.failures.get(kind, 0) + 1
        await self.on_judgment(kind)
