"""FastChat's `show_result` tables and `compute_agreement`, from judgment records (JSONL layout)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from bus import combine_games

__all__ = [
    "Agreement",
    "WinLoss",
    "compute_agreement",
    "failure_counts",
    "format_table",
    "is_pairwise",
    "pairwise_stats",
    "show_result",
    "single_scores",
    "votes",
]

Record = dict[str, Any]


def is_pairwise(judgments: Sequence[Record]) -> bool:
    return bool(judgments) and "model_1" in judgments[0]


def failure_counts(judgments: Iterable[Record]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in judgments:
        if r.get("error"):
            out[r["error"]] += 1
    return dict(out)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(vals: list[str]) -> str:
        pairs = enumerate(zip(vals, widths, strict=True))
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in pairs)

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- single


def single_scores(judgments: Iterable[Record]) -> dict[str, dict[str, list[float]]]:
    """model -> {"turn 1": [...], "turn 2": [...], "<category>": [...], "all": [...]} of usable scores."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in judgments:
        if r.get("error") or r.get("score", -1) == -1:
            continue  # failures are counted, never scored
        s = float(r["score"])
        by = out[r["model"]]
        by[f"turn {r['turn']}"].append(s)
        by[r.get("category", "?")].append(s)
        by["all"].append(s)
    return out


def _single_tables(judgments: list[Record]) -> list[str]:
    scores = single_scores(judgments)
    models = sorted(scores, key=lambda m: -_mean(scores[m]["all"]))
    turns = sorted({f"turn {r['turn']}" for r in judgments})
    rows = [
        [m, *(_mean(scores[m][t]) for t in turns), _mean(scores[m]["all"]), len(scores[m]["all"])]
        for m in models
    ]
    out = ["## Score per model (1-10)", format_table(["model", *turns, "average", "n"], rows)]
    cats = sorted({r.get("category", "?") for r in judgments})
    rows = [[m, *(_mean(scores[m][c]) for c in cats)] for m in models]
    out += ["", "## Score per category", format_table(["model", *cats], rows)]
    return out


# ----------------------------------------------------------------------------- pairwise


@dataclass
class WinLoss:
    win: int = 0
    loss: int = 0
    tie: int = 0

    @property
    def total(self) -> int:
        return self.win + self.loss + self.tie

    @property
    def win_rate(self) -> float:
        return self.win / self.total if self.total else float("nan")

    @property
    def loss_rate(self) -> float:
        return self.loss / self.total if self.total else float("nan")

    @property
    def win_rate_adjusted(self) -> float:
        return (self.win + 0.5 * self.tie) / self.total if self.total else float("nan")


def pairwise_stats(judgments: Iterable[Record], group: str = "") -> dict[tuple[str, str], WinLoss]:
    """(model, group value) -> wins/losses/ties; a tie when the two orders disagree (position swap)."""
    out: dict[tuple[str, str], WinLoss] = defaultdict(WinLoss)
    for r in judgments:
        result = combine_games(r.get("g1_winner", "error"), r.get("g2_winner", "error"))
        if result == "error":
            continue
        g = str(r.get(group, "?")) if group else ""
        a, b = out[(r["model_1"], g)], out[(r["model_2"], g)]
        if result == "tie":
            a.tie += 1
            b.tie += 1
        elif result == "model_1":
            a.win += 1
            b.loss += 1
        else:
            a.loss += 1
            b.win += 1
    return out


def _pairwise_tables(judgments: list[Record], baseline: str) -> list[str]:
    overall = {m: wl for (m, _), wl in pairwise_stats(judgments).items() if m != baseline}
    models = sorted(overall, key=lambda m: -overall[m].win_rate_adjusted)
    headers = ["model", "win", "loss", "tie", "win_rate", "loss_rate", "win_rate_adjusted"]
    rows = [
        [m, w.win, w.loss, w.tie, w.win_rate, w.loss_rate, w.win_rate_adjusted]
        for m, w in ((m, overall[m]) for m in models)
    ]
    title = f"## Pairwise against {baseline}" if baseline else "## Pairwise, all pairs"
    out = [title, format_table(headers, rows)]
    for group, label in (("turn", "turn"), ("category", "category")):
        stats = pairwise_stats(judgments, group)
        values = sorted({g for _, g in stats})
        rows = [
            [m, *(stats[(m, v)].win_rate_adjusted if (m, v) in stats else float("nan") for v in values)]
            for m in models
        ]
        out += [
            "",
            f"## Adjusted win rate per {label}",
            format_table(["model", *(f"{label} {v}" if label == "turn" else v for v in values)], rows),
        ]
    return out


# ----------------------------------------------------------------------------- both


def show_result(judgments: list[Record], *, baseline: str = "") -> str:
    """All tables for a judgment file, plus the failures that were left out of them."""
    if not judgments:
        return "no judgments"
    tables = _pairwise_tables(judgments, baseline) if is_pairwise(judgments) else _single_tables(judgments)
    judges = sorted({str((r.get("judge") or ["?"])[0]) for r in judgments})
    failures = failure_counts(judgments)
    usable = len(judgments) - sum(failures.values())
    tail = [
        "",
        f"judge: {', '.join(judges)}; {usable}/{len(judgments)} judgments usable"
        + (f"; not scored: {', '.join(f'{k} {v}' for k, v in sorted(failures.items()))}" if failures else ""),
    ]
    return "\n".join(tables + tail)


# ----------------------------------------------------------------------------- agreement


def votes(judgments: Iterable[Record]) -> dict[tuple[str, str, str, int], str]:
    """(question, model, model, turn) -> winner model name or 'tie'; single grades become pairwise votes."""
    out: dict[tuple[str, str, str, int], str] = {}
    judgments = list(judgments)
    if is_pairwise(judgments):
        for r in judgments:
            result = combine_games(r.get("g1_winner", "error"), r.get("g2_winner", "error"))
            if result == "error":
                continue
            a, b = sorted((r["model_1"], r["model_2"]))
            winner = r["model_1"] if result == "model_1" else r["model_2"] if result == "model_2" else "tie"
            out[(str(r["question_id"]), a, b, int(r["turn"]))] = winner
        return out
    by_q: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in judgments:
        if not r.get("error") and r.get("score", -1) != -1:
            by_q[(str(r["question_id"]), int(r["turn"]))][r["model"]] = float(r["score"])
    for (qid, turn), scores in by_q.items():
        for a, b in combinations(sorted(scores), 2):
            winner = a if scores[a] > scores[b] else b if scores[b] > scores[a] else "tie"
            out[(qid, a, b, turn)] = winner
    return out


@dataclass(frozen=True)
class Agreement:
    n: int
    agree: int
    n_without_ties: int
    agree_without_ties: int

    @property
    def rate(self) -> float:
        return self.agree / self.n if self.n else float("nan")

    @property
    def rate_without_ties(self) -> float:
        return self.agree_without_ties / self.n_without_ties if self.n_without_ties else float("nan")

    def __str__(self) -> str:
        return (
            f"agreement {self.rate:.1%} over {self.n} shared votes; "
            f"without ties {self.rate_without_ties:.1%} over {self.n_without_ties}"
        )


def compute_agreement(a: Iterable[Record], b: Iterable[Record]) -> Agreement:
    """How often two judges pick the same winner on the votes they share (FastChat's compute_agreement)."""
    va, vb = votes(a), votes(b)
    shared = sorted(set(va) & set(vb))
    agree = sum(va[k] == vb[k] for k in shared)
    decisive = [k for k in shared if va[k] != "tie" and vb[k] != "tie"]
    return Agreement(len(shared), agree, len(decisive), sum(va[k] == vb[k] for k in decisive))
