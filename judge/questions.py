"""Question sets in FastChat's JSONL format (question_id, category, turns, optional reference)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import msgspec

__all__ = [
    "NEED_REF_CATEGORIES",
    "Question",
    "builtin_path",
    "dump_questions",
    "load_questions",
    "load_references",
    "parse_questions",
    "select",
    "with_references",
]

NEED_REF_CATEGORIES = frozenset({"math", "reasoning", "coding"})


class Question(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    question_id: int | str
    category: str
    turns: list[str]
    reference: list[str] | None = None

    @property
    def needs_reference(self) -> bool:
        return self.category in NEED_REF_CATEGORIES


def builtin_path() -> Path:
    """The small question set written for this project (14 two-turn questions, 8 categories)."""
    return Path(__file__).resolve().parent / "data" / "questions.jsonl"


def parse_questions(text: str, source: str = "questions") -> list[Question]:
    out: list[Question] = []
    seen: set[int | str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = msgspec.json.decode(line, type=Question)
        except msgspec.DecodeError as e:
            raise ValueError(
                f"{source}:{n}: not a question ({e}); each line needs question_id, category and turns"
            ) from None
        if not q.turns:
            raise ValueError(f"{source}:{n}: question {q.question_id} has no turns")
        if q.question_id in seen:
            raise ValueError(f"{source}:{n}: question_id {q.question_id} appears twice")
        seen.add(q.question_id)
        out.append(q)
    if not out:
        raise ValueError(f"{source}: no questions in it")
    return out


def load_questions(path: Path | None = None) -> list[Question]:
    path = path or builtin_path()
    return parse_questions(path.read_text(encoding="utf-8"), str(path))


def load_references(path: Path) -> dict[int | str, list[str]]:
    """Reference answers from a FastChat answer file (`choices[0].turns`), e.g. reference_answer/gpt-4.jsonl."""
    refs: dict[int | str, list[str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            refs[row["question_id"]] = list(row["choices"][0]["turns"])
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise ValueError(
                f"{path}:{n}: not a FastChat answer line ({e!r}); need question_id and choices[0].turns"
            ) from None
    return refs


def with_references(questions: Iterable[Question], refs: dict[int | str, list[str]]) -> list[Question]:
    """Attach references to the questions that have none."""
    return [
        msgspec.structs.replace(q, reference=refs[q.question_id])
        if q.reference is None and q.question_id in refs
        else q
        for q in questions
    ]


def select(questions: list[Question], ids: list[int | str] | None = None, limit: int = 0) -> list[Question]:
    if ids:
        wanted = {str(i) for i in ids}
        questions = [q for q in questions if str(q.question_id) in wanted]
    return questions[:limit] if limit > 0 else questions


def dump_questions(questions: Iterable[Question]) -> bytes:
    return b"".join(msgspec.json.encode(q) + b"\n" for q in questions)
