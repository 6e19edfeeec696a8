"""What the Jobs page shows, UI-free: a live copy of the job records and readers of their events and results.

Train and eval results are read as plain dicts (the web app may not import trainer/ or judge/): every
field is looked up with a default, so a result of another version shows what it has and nothing breaks.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.js.kv import KeyValue

from bus import TERMINAL_STATES, BadMessage, JobEvent, JobRecord, KVMirror, Reconnects, combine_games, decode

__all__ = [
    "JobsMirror",
    "TrainView",
    "category_scores",
    "judge_board",
    "linked_evals",
    "parse_jsonl",
    "result_dict",
    "spec_dict",
    "verdict_rows",
]

Record = dict[str, Any]


class JobsMirror(KVMirror):
    """Every job record in `cb_jobs`, kept live by a watch; `version` moves on each change."""

    def __init__(self, kv: KeyValue, reconnects: Reconnects | None = None) -> None:
        super().__init__(kv, reconnects)
        self._records: dict[str, tuple[JobRecord, Record]] = {}
        self.version = 0

    def _apply(self, key: str, value: bytes | None) -> None:
        self.version += 1
        if value is None:
            self._records.pop(key, None)
            return
        with contextlib.suppress(BadMessage, msgspec.DecodeError):
            # The raw dict too: fields a newer writer added (say, an eval linked to a train job) show up.
            self._records[key] = (decode(value, JobRecord), msgspec.json.decode(value))

    def records(self) -> list[JobRecord]:
        """Newest first."""
        return sorted((r for r, _ in self._records.values()), key=lambda r: -r.submitted_at)

    def get(self, job_id: str) -> JobRecord | None:
        return next((r for r, _ in self._records.values() if r.job_id == job_id), None)

    def raw(self, job_id: str) -> Record:
        return next((d for r, d in self._records.values() if r.job_id == job_id), {})


def parse_jsonl(data: bytes) -> list[Record]:
    out = []
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


def result_dict(record: JobRecord) -> Record:
    return record.result if isinstance(record.result, dict) else {}


def spec_dict(record: JobRecord) -> Record:
    with contextlib.suppress(msgspec.DecodeError):
        spec = msgspec.json.decode(record.spec)
        return spec if isinstance(spec, dict) else {}
    return {}


@dataclass
class TrainView:
    """A train job as its events tell it: the loss per step and its checkpoints."""

    loss: dict[int, float] = field(default_factory=dict)  # step -> loss
    checkpoints: list[tuple[int, str, float]] = field(default_factory=list)  # (step, artifact, at)
    artifacts: list[str] = field(default_factory=list)
    last: JobEvent | None = None

    def add(self, event: JobEvent) -> None:
        self.last = event
        m = event.metrics
        if event.event == "progress" and "step" in m and "loss" in m and math.isfinite(m["loss"]):
            self.loss[int(m["step"])] = float(m["loss"])
        if event.event == "checkpoint":
            self.checkpoints += [(int(m.get("step", 0)), a, event.at) for a in event.artifacts]
        self.artifacts += [a for a in event.artifacts if a not in self.artifacts]

    def add_history(self, rows: Iterable[Record]) -> None:
        """The per-step metrics file of a finished job (every step, even those no event carried)."""
        for row in rows:
            step, loss = row.get("step"), row.get("loss")
            if isinstance(step, int | float) and isinstance(loss, int | float) and math.isfinite(loss):
                self.loss[int(step)] = float(loss)

    @property
    def ended(self) -> bool:
        return self.last is not None and self.last.state in TERMINAL_STATES and self.last.event != "queued"


def _match_result(r: Record) -> str:
    return combine_games(str(r.get("g1_winner", "error")), str(r.get("g2_winner", "error")))


def category_scores(judgments: list[Record]) -> dict[str, dict[str, float]]:
    """model -> category -> mean score (single grading, 1-10) or adjusted win rate in % (pairwise)."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in judgments:
        category = str(r.get("category") or "?")
        if "model_1" in r:
            result = _match_result(r)
            if result == "error":
                continue
            for side in ("model_1", "model_2"):
                won = 1.0 if result == side else 0.5 if result == "tie" else 0.0
                sums[str(r.get(side))][category].append(100 * won)
        else:
            score = r.get("score", -1)
            if r.get("error") or not isinstance(score, int | float) or score < 0:
                continue  # failures are counted by the judge, never scored
            sums[str(r.get("model"))][category].append(float(score))
    return {m: {c: sum(v) / len(v) for c, v in sorted(cats.items())} for m, cats in sorted(sums.items())}


def verdict_rows(judgments: list[Record]) -> list[Record]:
    """One table row per judgment: question, category, turn, who, the verdict and the judge's words."""
    rows = []
    for i, r in enumerate(judgments):
        pairwise = "model_1" in r
        if r.get("error"):
            verdict = f"not scored ({r.get('error')})"
        elif pairwise:
            result = _match_result(r)
            verdict = "tie" if result == "tie" else str(r.get(result, result))
        else:
            verdict = f"{r.get('score')}/10"
        text = str(r.get("g1_judgment", "") if pairwise else r.get("judgment", ""))
        rows.append(
            {
                "id": i,
                "question": str(r.get("question_id", "")),
                "category": str(r.get("category", "")),
                "turn": r.get("turn", ""),
                "model": f"{r.get('model_1')} vs {r.get('model_2')}" if pairwise else str(r.get("model", "")),
                "verdict": verdict,
                "judgment": text if len(text) <= 240 else text[:239] + "…",
            }
        )
    return rows


def linked_evals(raw: Record) -> list[tuple[str, Record]]:
    """Eval results a train job's record links to, however a writer put them: (label, result-ish dict)
    for every field whose name mentions "eval" and holds scores, or a job id (label only, empty dict)."""
    found: list[tuple[str, Record]] = []

    def visit(name: str, value: Any, depth: int) -> None:
        if depth > 3:
            return
        if isinstance(value, dict):
            if any(k in value for k in ("scores", "win_rates", "score", "base_score", "adapter_score")):
                found.append((name, value))
                return
            for k, v in value.items():
                visit(f"{name}.{k}" if name else str(k), v, depth + 1)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                visit(f"{name}[{i}]", v, depth + 1)
        elif isinstance(value, str) and value.startswith("eval-") and "eval" in name.lower():
            found.append((value, {}))

    for key, value in raw.items():
        if "eval" in key.lower():
            visit(key, value, 0)
    if raw.get("kind") == "train" and isinstance(raw.get("scores"), dict) and raw["scores"]:
        found.append(("judged against its base", {"scores": raw["scores"]}))  # the closed loop's field
    result = raw.get("result")
    if isinstance(result, dict):
        for key, value in result.items():
            if "eval" in key.lower():
                visit(f"result.{key}", value, 0)
    return found


def judge_board(records: Iterable[JobRecord]) -> dict[str, Record]:
    """model -> its latest judge result among finished eval jobs: score (single) or win rate (pairwise)."""
    board: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r.updated_at):
        if r.kind != "eval" or r.state != "done":
            continue
        res = result_dict(r)
        for kind, values in (("score", res.get("scores")), ("win_rate", res.get("win_rates"))):
            if not isinstance(values, dict):
                continue
            for model, value in values.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    board[str(model)] = {
                        "kind": kind,
                        "value": float(value),
                        "judge": str(res.get("judge", "")),
                        "questions": res.get("questions", 0),
                        "job_id": r.job_id,
                        "at": r.updated_at,
                    }
    return board
