"""Reading a judge's reply: a [[rating]] or an [[A]]/[[B]]/[[C]] verdict, and the position-swap rule.

A judge on the bus is constrained to a JSON verdict (`verdict_schema`) that `verdict_text` turns back
into the bracketed form, so even a tiny judge model's every judgment parses.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

__all__ = [
    "Unparseable",
    "Verdict",
    "pair_winner",
    "parse_choice",
    "parse_rating",
    "verdict_instruction",
    "verdict_schema",
    "verdict_text",
]

Verdict = Literal["rating", "choice"]
_OVERHEAD_TOKENS = 16  # the JSON around the explanation
_MAX_EXPLANATION = 1000  # characters

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_LOOSE = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")  # "[7]": a judge that lost one bracket
_CHOICE = re.compile(r"\[\[\s*([ABC])\s*\]\]")


class Unparseable(ValueError):
    """The judge answered but gave no single clear verdict; counted, never scored."""


def parse_rating(text: str, low: float = 1.0, high: float = 10.0) -> float:
    """The rating in `[[N]]` (or `[N]` when no double brackets appear); one distinct value, in range."""
    values = _RATING.findall(text) or _RATING_LOOSE.findall(text)
    distinct = {float(v) for v in values}
    if not distinct:
        raise Unparseable("no [[rating]] in the judgment")
    if len(distinct) > 1:
        raise Unparseable(f"several different ratings in the judgment: {sorted(distinct)}")
    rating = distinct.pop()
    if not low <= rating <= high:
        raise Unparseable(f"rating {rating:g} is outside {low:g}..{high:g}")
    return rating


def parse_choice(text: str) -> str:
    """'A', 'B' or 'C' (tie) from `[[A]]`/`[[B]]`/`[[C]]`; several different verdicts are unparseable."""
    distinct = set(_CHOICE.findall(text))
    if not distinct:
        raise Unparseable("no [[A]], [[B]] or [[C]] verdict in the judgment")
    if len(distinct) > 1:
        raise Unparseable(f"several different verdicts in the judgment: {sorted(distinct)}")
    return distinct.pop()


def pair_winner(choice: str, swapped: bool) -> str:
    """A game's verdict in terms of the match: 'model_1', 'model_2' or 'tie'.

    Game 1 shows model_1 as A; game 2 (swapped) shows model_2 as A."""
    if choice == "C":
        return "tie"
    first = "model_1" if choice == "A" else "model_2"
    if not swapped:
        return first
    return "model_2" if first == "model_1" else "model_1"


def verdict_schema(kind: Verdict, max_tokens: int) -> dict[str, Any]:
    """The JSON a constrained judge writes: an explanation that fits `max_tokens`, then the verdict.

    The explanation allows only characters that are each at least one token and need no escaping,
    so `max_tokens - overhead` characters always leave room for the verdict.
    """
    room = max(0, min(_MAX_EXPLANATION, max_tokens - _OVERHEAD_TOKENS))
    verdict: dict[str, Any] = (
        {"type": "integer", "minimum": 1, "maximum": 10} if kind == "rating" else {"enum": ["A", "B", "C"]}
    )
    return {
        "type": "object",
        "properties": {
            "explanation": {"type": "string", "pattern": f"^[A-Za-z0-9 ,.;:!?'()-]{{0,{room}}}$"},
            kind: verdict,
        },
        "required": ["explanation", kind],
        "additionalProperties": False,
    }


def verdict_instruction(kind: Verdict) -> str:
    """What to tell a constrained judge about the JSON it must write."""
    if kind == "rating":
        return 'Reply with a JSON object: {"explanation": "<short evaluation>", "rating": <1 to 10>}.'
    return 'Reply with a JSON object: {"explanation": "<short comparison>", "choice": "A", "B" or "C" (tie)}.'


def verdict_text(reply: str, kind: Verdict) -> str:
    """A constrained judge's JSON reply as the bracketed judgment parse_rating/parse_choice read."""
    try:
        data = json.loads(reply)
        explanation, value = str(data["explanation"]), data[kind]
    except (ValueError, KeyError, TypeError):
        return reply  # cut short (max_tokens): left to the parser, which counts it
    explanation = explanation.replace("[[", "[").replace("]]", "]")
    label = "Rating" if kind == "rating" else "Verdict"
    return f"{explanation}\n\n{label}: [[{value}]]"
