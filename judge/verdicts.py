"""Reading a judge's reply: a [[rating]] or an [[A]]/[[B]]/[[C]] verdict, and the position-swap rule."""

from __future__ import annotations

import re

__all__ = ["Unparseable", "combine_games", "pair_winner", "parse_choice", "parse_rating"]

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


def combine_games(g1_winner: str, g2_winner: str) -> str:
    """The match result: a winner only when both orders agree, else a tie ('error' if a game failed)."""
    if "error" in (g1_winner, g2_winner):
        return "error"
    if g1_winner == g2_winner:
        return g1_winner
    return "tie"
