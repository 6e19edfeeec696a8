"""Arena ratings from pairwise battles: online Elo, Bradley–Terry MLE, bootstrap CIs, win rates.

Pure Python (no numpy) so the web app and the judge share it without heavy imports. Conventions
follow FastChat's leaderboard: ratings on the Elo scale (400 points = 10x odds, 1000 = average),
online Elo with K=4, ties (including both-bad) count half a win for each side, and the win-rate
matrix counts decisive battles only.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Battle",
    "Rating",
    "battle_counts",
    "battle_from_vote",
    "bootstrap",
    "compute_bt",
    "compute_elo",
    "leaderboard",
    "win_rate_matrix",
]

Winner = Literal["model_a", "model_b", "tie", "tie (bothbad)"]
_WINNER_BY_VOTE: dict[str, Winner] = {
    "leftvote": "model_a",
    "rightvote": "model_b",
    "tievote": "tie",
    "bothbad_vote": "tie (bothbad)",
}


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: Winner

    @property
    def score_a(self) -> float:
        """1 when model_a won, 0 when it lost, 0.5 for any tie."""
        return 1.0 if self.winner == "model_a" else 0.0 if self.winner == "model_b" else 0.5


def battle_from_vote(kind: str, model_a: str, model_b: str) -> Battle:
    """The battle a FastChat vote type (leftvote, rightvote, tievote, bothbad_vote) records."""
    try:
        return Battle(model_a, model_b, _WINNER_BY_VOTE[kind])
    except KeyError:
        raise ValueError(f"{kind!r} is not a battle vote; use one of {sorted(_WINNER_BY_VOTE)}") from None


def compute_elo(
    battles: Sequence[Battle],
    *,
    k: float = 4.0,
    scale: float = 400.0,
    base: float = 10.0,
    init: float = 1000.0,
) -> dict[str, float]:
    """Online Elo: each battle in order moves both ratings by K * (score - expected)."""
    rating: dict[str, float] = defaultdict(lambda: init)
    for b in battles:
        ra, rb = rating[b.model_a], rating[b.model_b]
        expected_a = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        rating[b.model_a] = ra + k * (b.score_a - expected_a)
        rating[b.model_b] = rb + k * ((1.0 - b.score_a) - (1.0 - expected_a))
    return dict(rating)


def compute_bt(
    battles: Sequence[Battle],
    *,
    scale: float = 400.0,
    base: float = 10.0,
    init: float = 1000.0,
    prior: float = 0.0,
    max_iter: int = 2000,
    tol: float = 1e-10,
) -> dict[str, float]:
    """Bradley–Terry maximum likelihood (Hunter's MM iterations), ties as half a win each.

    `prior` adds that many virtual ties between every pair of models, which keeps a model that
    never won finite (its MLE is minus infinity otherwise). Ratings average `init`.
    """
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    if not models:
        return {}
    wins: dict[str, float] = dict.fromkeys(models, 0.0)
    games: dict[tuple[str, str], float] = defaultdict(float)
    for b in battles:
        wins[b.model_a] += b.score_a
        wins[b.model_b] += 1.0 - b.score_a
        games[b.model_a, b.model_b] += 1.0
        games[b.model_b, b.model_a] += 1.0
    if prior > 0:
        for i, a in enumerate(models):
            for c in models[i + 1 :]:
                games[a, c] += 2 * prior
                games[c, a] += 2 * prior
                wins[a] += prior
                wins[c] += prior
    opponents: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for (a, c), n in games.items():
        opponents[a].append((c, n))
    strength = dict.fromkeys(models, 1.0)
    for _ in range(max_iter):
        new = {}
        for m in models:
            denom = sum(n / (strength[m] + strength[c]) for c, n in opponents[m])
            new[m] = max(wins[m] / denom, 1e-300) if denom > 0 else strength[m]
        log_mean = sum(math.log(v) for v in new.values()) / len(new)
        new = {m: v / math.exp(log_mean) for m, v in new.items()}
        change = max(abs(math.log(new[m]) - math.log(strength[m])) for m in models)
        strength = new
        if change < tol:
            break
    return {m: init + scale * math.log(strength[m], base) for m in models}


def bootstrap(
    battles: Sequence[Battle],
    rate: Callable[[Sequence[Battle]], dict[str, float]],
    *,
    rounds: int = 100,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals of `rate` over battles resampled with replacement."""
    rng = random.Random(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for model, value in rate(rng.choices(battles, k=len(battles))).items():
            samples[model].append(value)
    return {m: (_quantile(v, alpha / 2), _quantile(v, 1 - alpha / 2)) for m, v in samples.items()}


def _quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def battle_counts(battles: Sequence[Battle]) -> dict[str, dict[str, int]]:
    """counts[a][b]: battles between a and b (either side)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for b in battles:
        counts[b.model_a][b.model_b] += 1
        counts[b.model_b][b.model_a] += 1
    return {a: dict(row) for a, row in counts.items()}


def win_rate_matrix(battles: Sequence[Battle]) -> dict[str, dict[str, float]]:
    """rate[a][b]: the fraction of decisive (non-tie) battles between a and b that a won."""
    won: dict[tuple[str, str], int] = defaultdict(int)
    for b in battles:
        if b.winner == "model_a":
            won[b.model_a, b.model_b] += 1
        elif b.winner == "model_b":
            won[b.model_b, b.model_a] += 1
    rate: dict[str, dict[str, float]] = defaultdict(dict)
    for a, c in list(won):
        total = won[a, c] + won.get((c, a), 0)
        rate[a][c] = won[a, c] / total
        rate[c][a] = won.get((c, a), 0) / total
    return {a: dict(row) for a, row in rate.items()}


@dataclass(frozen=True)
class Rating:
    model: str
    elo: float
    bt: float
    bt_ci: tuple[float, float]
    battles: int
    wins: int
    ties: int
    losses: int

    @property
    def win_rate(self) -> float:
        """Wins over decisive battles (0 when there are none)."""
        decisive = self.wins + self.losses
        return self.wins / decisive if decisive else 0.0


def leaderboard(
    battles: Sequence[Battle], *, rounds: int = 100, seed: int = 0, prior: float = 0.1
) -> list[Rating]:
    """One row per model, best Bradley–Terry rating first, with bootstrap 95% intervals."""
    if not battles:
        return []
    elo = compute_elo(battles)
    bt = compute_bt(battles, prior=prior)
    ci = bootstrap(battles, lambda bs: compute_bt(bs, prior=prior, tol=1e-6), rounds=rounds, seed=seed)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # wins, ties, losses
    for b in battles:
        a_idx = 0 if b.winner == "model_a" else 2 if b.winner == "model_b" else 1
        tally[b.model_a][a_idx] += 1
        tally[b.model_b][2 - a_idx] += 1
    rows = [
        Rating(m, elo[m], bt[m], ci.get(m, (bt[m], bt[m])), sum(t), t[0], t[1], t[2])
        for m, t in tally.items()
    ]
    return sorted(rows, key=lambda r: -r.bt)
