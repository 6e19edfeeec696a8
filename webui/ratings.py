"""Arena ratings from pairwise battles: online Elo, Bradley–Terry MLE, bootstrap CIs, win rates.

Pure Python (no numpy): the web app's leaderboard and battle pages are its only users. Conventions
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
    "PROVISIONAL_BATTLES",
    "Battle",
    "Rating",
    "battle_counts",
    "battle_from_vote",
    "bootstrap",
    "compute_bt",
    "compute_bt_style",
    "compute_elo",
    "dedupe_prompts",
    "leaderboard",
    "pair_probabilities",
    "ranks_from_ci",
    "win_rate_matrix",
]

PROVISIONAL_BATTLES = 10  # fewer rated battles than this: the rank is shown as provisional

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
    len_a: int = 0  # characters of model_a's answers (the style covariate); 0: unknown
    len_b: int = 0
    prompt: str = ""  # the first question, for de-duplication

    @property
    def score_a(self) -> float:
        """1 when model_a won, 0 when it lost, 0.5 for any tie."""
        return 1.0 if self.winner == "model_a" else 0.0 if self.winner == "model_b" else 0.5


def battle_from_vote(kind: str, model_a: str, model_b: str, **details: int | str) -> Battle:
    """The battle a FastChat vote type (leftvote, rightvote, tievote, bothbad_vote) records."""
    try:
        return Battle(model_a, model_b, _WINNER_BY_VOTE[kind], **details)  # type: ignore[arg-type]
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
    rank: int = 0  # from CI overlap: 1 + models whose lower bound is above this one's upper bound

    @property
    def provisional(self) -> bool:
        return self.battles < PROVISIONAL_BATTLES

    @property
    def win_rate(self) -> float:
        """Wins over decisive battles (0 when there are none)."""
        decisive = self.wins + self.losses
        return self.wins / decisive if decisive else 0.0


def leaderboard(
    battles: Sequence[Battle], *, rounds: int = 100, seed: int = 0, prior: float = 0.1, style: bool = False
) -> list[Rating]:
    """One row per model, best Bradley–Terry rating first, with bootstrap 95% intervals and ranks
    from their overlap. `style`: control for answer length (`compute_bt_style`) instead."""
    battles = [b for b in battles if b.model_a != b.model_b]  # no self-battles
    if not battles:
        return []
    elo = compute_elo(battles)
    if style:  # l2 plays the prior's part: it keeps a model that never lost finite

        def rate(bs: Sequence[Battle]) -> dict[str, float]:
            return compute_bt_style(bs, l2=prior, max_iter=20)[0]

        bt = rate(battles)
    else:

        def rate(bs: Sequence[Battle]) -> dict[str, float]:
            return compute_bt(bs, prior=prior, tol=1e-6)

        bt = compute_bt(battles, prior=prior)
    ci = bootstrap(battles, rate, rounds=rounds, seed=seed)
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # wins, ties, losses
    for b in battles:
        a_idx = 0 if b.winner == "model_a" else 2 if b.winner == "model_b" else 1
        tally[b.model_a][a_idx] += 1
        tally[b.model_b][2 - a_idx] += 1
    intervals = {m: ci.get(m, (bt[m], bt[m])) for m in tally}
    # A collapsed interval (every resample the same, as with one battle) tells nothing: no rank from it.
    ranks = ranks_from_ci(
        {m: iv if iv[1] - iv[0] >= 1 else (-math.inf, math.inf) for m, iv in intervals.items()}
    )
    rows = [
        Rating(m, elo[m], bt[m], intervals[m], sum(t), t[0], t[1], t[2], ranks[m]) for m, t in tally.items()
    ]
    return sorted(rows, key=lambda r: -r.bt)


def ranks_from_ci(intervals: dict[str, tuple[float, float]]) -> dict[str, int]:
    """LMSYS's rank: 1 + the number of models that are better beyond doubt (their interval's lower
    bound above this model's upper bound). Models whose intervals overlap share a rank."""
    return {m: 1 + sum(1 for lo, _ in intervals.values() if lo > hi) for m, (_, hi) in intervals.items()}


def _style(b: Battle) -> float:
    total = b.len_a + b.len_b
    return (b.len_a - b.len_b) / total if total else 0.0


def compute_bt_style(
    battles: Sequence[Battle],
    *,
    scale: float = 400.0,
    base: float = 10.0,
    init: float = 1000.0,
    l2: float = 0.0,
    max_iter: int = 100,
) -> tuple[dict[str, float], float]:
    """Bradley–Terry with answer length as a covariate (LMSYS's style control), and its coefficient.

    Logistic regression of "A won" on +1/-1 model indicators plus the normalised length difference
    (len_a - len_b) / (len_a + len_b); a tie counts as half a win each. Newton's method; `l2` keeps
    ratings finite when a model never lost or never won. The ratings are what is left once longer
    answers' advantage is taken out, centred on `init`.
    """
    battles = [b for b in battles if b.model_a != b.model_b]
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    if not models:
        return {}, 0.0
    # With l2 every model gets a coefficient (the penalty pins them down); without, the first is the reference.
    free = models if l2 > 0 else models[1:]
    index = {m: i for i, m in enumerate(free)}
    styled = any(_style(b) for b in battles)  # no length differences at all: plain Bradley–Terry
    k = len(free) + styled  # the model coefficients (+ the style coefficient)
    # Sparse rows (at most three non-zeros), identical ones merged: (non-zeros, battles, A's score sum).
    merged: dict[tuple[tuple[int, float], ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for b in battles:
        x: dict[int, float] = defaultdict(float)
        if b.model_a in index:
            x[index[b.model_a]] += 1.0
        if b.model_b in index:
            x[index[b.model_b]] -= 1.0
        if styled:
            x[k - 1] = _style(b)
        cell = merged[tuple(sorted((i, v) for i, v in x.items() if v))]
        cell[0] += 1.0
        cell[1] += b.score_a
    rows = [(nz, n, wins) for nz, (n, wins) in merged.items()]
    beta = [0.0] * k
    for _ in range(max_iter):
        grad = [-l2 * w for w in beta]
        hess = [[(l2 if i == j else 0.0) for j in range(k)] for i in range(k)]
        for nz, n, wins in rows:
            p = 1.0 / (1.0 + math.exp(-sum(beta[i] * v for i, v in nz)))
            curve = n * p * (1 - p)
            for i, vi in nz:
                grad[i] += (wins - n * p) * vi
                for j, vj in nz:
                    hess[i][j] += curve * vi * vj
        step = _solve(hess, grad)
        beta = [w + d for w, d in zip(beta, step, strict=True)]
        if max((abs(d) for d in step), default=0.0) < 1e-10:
            break
    logits = [beta[index[m]] if m in index else 0.0 for m in models]
    mean = sum(logits) / len(logits)
    per_logit = scale / math.log(base)
    return {m: init + per_logit * (v - mean) for m, v in zip(models, logits, strict=True)}, (
        beta[-1] if styled else 0.0
    )


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (the systems here are a few models wide)."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            raise ValueError("the battles do not determine the ratings (add l2 or battles)")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (m[r][n] - sum(m[r][c] * out[c] for c in range(r + 1, n))) / m[r][r]
    return out


def dedupe_prompts(battles: Sequence[Battle], *, keep: int = 3) -> list[Battle]:
    """At most `keep` battles per prompt (case and spacing ignored), the earliest ones: one "hi"
    asked a thousand times must not decide the ranking."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for b in battles:
        key = " ".join(b.prompt.lower().split())
        seen[key] += 1
        if not key or seen[key] <= keep:
            out.append(b)
    return out


def pair_probabilities(models: Sequence[str], battles_of: dict[str, int]) -> dict[tuple[str, str], float]:
    """How likely the arena draws each pair of different models: weight 1 / (1 + battles so far)
    per model, a pair in proportion to the product, so new models are sampled more; no self-pairs."""
    weight = {m: 1.0 / (1 + battles_of.get(m, 0)) for m in models}
    pairs = {(a, b): weight[a] * weight[b] for i, a in enumerate(models) for b in models[i + 1 :]}
    total = sum(pairs.values())
    return {pair: w / total for pair, w in pairs.items()} if total else {}
