"""Elo, Bradley–Terry and bootstrap intervals against values computed by hand."""

from __future__ import annotations

import math
import random

import pytest

from webui.ratings import (
    Battle,
    battle_counts,
    battle_from_vote,
    bootstrap,
    compute_bt,
    compute_elo,
    leaderboard,
    win_rate_matrix,
)


def test_votes_map_to_fastchat_winners() -> None:
    assert battle_from_vote("leftvote", "a", "b").winner == "model_a"
    assert battle_from_vote("rightvote", "a", "b").winner == "model_b"
    assert battle_from_vote("tievote", "a", "b").score_a == 0.5
    assert battle_from_vote("bothbad_vote", "a", "b").score_a == 0.5
    with pytest.raises(ValueError, match="not a battle vote"):
        battle_from_vote("upvote", "a", "b")


def test_elo_two_battles_by_hand() -> None:
    # Battle 1: equal ratings, expected 0.5, K=4 -> a 1002, b 998.
    r = compute_elo([Battle("a", "b", "model_a")])
    assert r == {"a": 1002.0, "b": 998.0}
    # Battle 2: b (998) beats a (1002): expected_b = 1 / (1 + 10^(4/400)) = 0.4942448...
    expected_b = 1 / (1 + 10 ** (4 / 400))
    r = compute_elo([Battle("a", "b", "model_a"), Battle("b", "a", "model_a")])
    assert r["b"] == pytest.approx(998 + 4 * (1 - expected_b))
    assert r["a"] == pytest.approx(1002 - 4 * (1 - expected_b))
    assert r["b"] == pytest.approx(1000.02302, abs=1e-4)


def test_elo_tie_between_equals_changes_nothing() -> None:
    assert compute_elo([Battle("a", "b", "tie (bothbad)")]) == {"a": 1000.0, "b": 1000.0}


def test_bt_two_models_closed_form() -> None:
    # a beats b 3 times out of 4: p_a / p_b = 3, so a - b = 400 * log10(3) = 190.85, mean 1000.
    battles = [Battle("a", "b", "model_a")] * 3 + [Battle("a", "b", "model_b")]
    r = compute_bt(battles)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert r["a"] == pytest.approx(1000 + 200 * math.log10(3), abs=1e-6)
    assert r["a"] == pytest.approx(1095.4243, abs=1e-3)


def test_bt_ties_count_half() -> None:
    # 1 win + 2 ties for a: a scores 2 of 3, b 1 -> odds 2 -> a - b = 400 * log10(2).
    battles = [Battle("a", "b", "model_a"), Battle("a", "b", "tie"), Battle("b", "a", "tie")]
    r = compute_bt(battles)
    assert r["a"] - r["b"] == pytest.approx(400 * math.log10(2), abs=1e-6)


def test_bt_rock_paper_scissors_is_flat() -> None:
    battles = [Battle("a", "b", "model_a"), Battle("b", "c", "model_a"), Battle("c", "a", "model_a")] * 2
    r = compute_bt(battles)
    assert all(v == pytest.approx(1000.0, abs=1e-6) for v in r.values())


def test_bt_mle_matches_observed_scores() -> None:
    """At the MLE every model's expected score equals its observed score (the likelihood equations)."""
    rng = random.Random(1)
    true = {"a": 2.0, "b": 1.0, "c": 0.5, "d": 0.25}
    battles = []
    for _ in range(400):
        x, y = rng.sample(sorted(true), 2)
        battles.append(Battle(x, y, "model_a" if rng.random() < true[x] / (true[x] + true[y]) else "model_b"))
    r = compute_bt(battles)
    p = {m: 10 ** ((v - 1000) / 400) for m, v in r.items()}
    for m in true:
        observed = sum(
            b.score_a if b.model_a == m else 1 - b.score_a for b in battles if m in (b.model_a, b.model_b)
        )
        expected = sum(
            p[m] / (p[m] + p[b.model_b if b.model_a == m else b.model_a])
            for b in battles
            if m in (b.model_a, b.model_b)
        )
        assert expected == pytest.approx(observed, abs=1e-4)
    assert [m for m, _ in sorted(r.items(), key=lambda kv: -kv[1])] == ["a", "b", "c", "d"]


def test_prior_keeps_a_winless_model_finite() -> None:
    r = compute_bt([Battle("a", "b", "model_a")] * 5, prior=0.1)
    assert math.isfinite(r["b"]) and r["b"] < r["a"]


def test_bootstrap_interval_contains_estimate_and_is_seeded() -> None:
    battles = [Battle("a", "b", "model_a")] * 30 + [Battle("a", "b", "model_b")] * 10
    ci = bootstrap(battles, lambda bs: compute_bt(bs, prior=0.1), rounds=50, seed=3)
    est = compute_bt(battles, prior=0.1)
    assert ci["a"][0] <= est["a"] <= ci["a"][1]
    assert ci["a"][0] < ci["a"][1]
    assert ci == bootstrap(battles, lambda bs: compute_bt(bs, prior=0.1), rounds=50, seed=3)


def test_win_rates_counts_and_leaderboard() -> None:
    battles = [
        Battle("a", "b", "model_a"),
        Battle("b", "a", "model_b"),
        Battle("a", "b", "model_b"),
        Battle("a", "b", "tie"),
    ]
    rates = win_rate_matrix(battles)
    assert rates["a"]["b"] == pytest.approx(2 / 3) and rates["b"]["a"] == pytest.approx(1 / 3)
    assert battle_counts(battles) == {"a": {"b": 4}, "b": {"a": 4}}
    board = leaderboard(battles, rounds=20)
    assert [r.model for r in board] == ["a", "b"]
    a = board[0]
    assert (a.battles, a.wins, a.ties, a.losses) == (4, 2, 1, 1)
    assert a.win_rate == pytest.approx(2 / 3)
    assert leaderboard([]) == []
