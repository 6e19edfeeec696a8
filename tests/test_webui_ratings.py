"""The arena's rating rules (style control, CI-overlap ranks, pair draws, de-duplication) against values worked out by hand."""

from __future__ import annotations

import math
import random
import time

import pytest

from bus.schemas import ChatMessage
from bus.schemas_logs import ConvState, VoteLog
from webui.config import Limits
from webui.limits import LimitExceeded, RateLimiter
from webui.logstore import battles_from_votes
from webui.pages.duel import draw_pair
from webui.pages.leaderboard import _rows
from webui.ratings import (
    PROVISIONAL_BATTLES,
    Battle,
    compute_bt,
    compute_bt_style,
    dedupe_prompts,
    leaderboard,
    pair_probabilities,
    ranks_from_ci,
)


def _b(winner: str, len_a: int = 0, len_b: int = 0, prompt: str = "") -> Battle:
    return Battle("A", "B", winner, len_a=len_a, len_b=len_b, prompt=prompt)  # type: ignore[arg-type]


def test_style_control_takes_the_length_advantage_out() -> None:
    # A's answer longer (style +0.5): A wins 3 of 4. A's shorter (style -0.5): 1 of 2.
    # Two cells, two parameters: the fit reproduces both frequencies exactly, so
    # beta + 0.5 g = ln 3 and beta - 0.5 g = 0: beta = ln(3) / 2, g = ln 3, and the rating gap is
    # beta * 400 / ln 10 = 200 log10(3) = 95.42, where plain Bradley-Terry (A wins 4 of 6) says 400 log10(2) = 120.41.
    battles = (
        [_b("model_a", 30, 10)] * 3 + [_b("model_b", 30, 10)] + [_b("model_a", 10, 30), _b("model_b", 10, 30)]
    )
    ratings, length = compute_bt_style(battles)
    assert length == pytest.approx(math.log(3))
    assert ratings["A"] - ratings["B"] == pytest.approx(200 * math.log10(3))
    assert (ratings["A"] + ratings["B"]) / 2 == pytest.approx(1000)
    plain = compute_bt(battles)
    assert plain["A"] - plain["B"] == pytest.approx(400 * math.log10(2))


def test_style_control_without_length_differences_is_plain_bradley_terry() -> None:
    battles = [_b("model_a"), _b("model_a"), _b("model_b")]  # A wins 2 of 3: gap 400 log10(2)
    ratings, length = compute_bt_style(battles)
    assert length == 0.0 and ratings["A"] - ratings["B"] == pytest.approx(400 * math.log10(2))
    ties = [_b("tie", 20, 10), _b("tie (bothbad)", 10, 20)]  # ties only: all even
    even, _ = compute_bt_style(ties)
    assert even["A"] == pytest.approx(1000) and even["B"] == pytest.approx(1000)


def test_ranks_come_from_interval_overlap() -> None:
    intervals = {"a": (1050.0, 1150.0), "b": (1000.0, 1100.0), "c": (900.0, 1040.0), "d": (800.0, 900.0)}
    # b overlaps a: both rank 1. Only a is surely above c (1050 > 1040): rank 2.
    # a and b are above d (lower bounds over 900), c is not (900 is not above 900): rank 3.
    assert ranks_from_ci(intervals) == {"a": 1, "b": 1, "c": 2, "d": 3}


def test_pairs_favour_new_models_and_never_a_model_against_itself() -> None:
    # weights 1/(1+battles): A 1, B 1/2, C 1/4; pairs AB .5, AC .25, BC .125 of .875 total.
    probs = pair_probabilities(["A", "B", "C"], {"B": 1, "C": 3})
    assert probs == pytest.approx({("A", "B"): 4 / 7, ("A", "C"): 2 / 7, ("B", "C"): 1 / 7})
    rng = random.Random(7)
    old = [Battle("old", "older", "tie")] * 30
    drawn = [draw_pair(["old", "older", "new"], old, rng) for _ in range(300)]
    assert all(a != b for a, b in drawn)
    with_new = sum("new" in pair for pair in drawn)
    assert with_new > 250  # P = 2 * (1/31) / (2/31 + 1/31^2) = 0.98 per draw
    assert {tuple(p) for p in drawn} >= {("new", "old"), ("old", "new")}  # both sides


def test_repeated_prompts_count_a_few_times_only() -> None:
    battles = [_b("model_a", prompt=p) for p in ("hi", "Hi ", "HI", "hi", "other", "")] + [
        _b("model_a", prompt="")
    ]
    kept = dedupe_prompts(battles, keep=2)
    assert [b.prompt for b in kept] == ["hi", "Hi ", "other", "", ""]


def _vote(
    models: list[str], kind: str = "leftvote", prompt: str = "q", answers: tuple[str, str] = ("x", "yy")
) -> VoteLog:
    states = [
        ConvState(
            conv_id=f"c{i}",
            model=m,
            messages=[ChatMessage(role="user", content=prompt), ChatMessage(role="assistant", content=a)],
        )
        for i, (m, a) in enumerate(zip(models, answers, strict=True))
    ]
    return VoteLog(kind=kind, tstamp=time.time(), mode="side_by_side", models=models, states=states)  # type: ignore[arg-type]


def test_named_votes_of_a_model_against_itself_are_not_rated() -> None:
    votes = [_vote(["m", "m"]), _vote(["m", "n"], prompt="other")]
    battles = battles_from_votes(votes, include_named=True)
    assert [(b.model_a, b.model_b) for b in battles] == [("m", "n")]
    assert (battles[0].len_a, battles[0].len_b, battles[0].prompt) == (1, 2, "other")
    assert [r.model for r in leaderboard([Battle("m", "m", "model_a")])] == []


def test_one_battle_is_provisional_with_no_interval_yet() -> None:
    rows = _rows(leaderboard([Battle("m", "n", "model_a")], rounds=20))
    assert [r["rank"] for r in rows] == ["1 (provisional)", "1 (provisional)"]
    assert rows[0]["ci"] == "— (too few battles)"
    many = [Battle("m", "n", "model_a")] * 30 + [Battle("m", "n", "model_b")] * 10
    rows = _rows(leaderboard(many, rounds=50))
    assert rows[0]["rank"] == "1" and rows[0]["ci"].startswith("+") and 40 >= PROVISIONAL_BATTLES


def test_votes_per_hour_are_limited_and_refill() -> None:
    now = [0.0]
    limiter = RateLimiter(Limits(votes_per_hour=2), clock=lambda: now[0])
    limiter.vote("u")
    limiter.vote("u")
    with pytest.raises(LimitExceeded, match=r"limit of 2 votes an hour.*30 min") as e:
        limiter.vote("u")
    assert e.value.retry_after_s == pytest.approx(1800)
    limiter.vote("someone else")
    now[0] = 1800.0
    limiter.vote("u")  # one vote back after half an hour
