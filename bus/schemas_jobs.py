"""Wire messages of the job family: train and eval jobs, their records and progress events.

A job's `spec` is carried raw: the envelope is shared, the spec's type belongs to the worker kind
(trainer/, judge/), which defines it in its own schemas module and decodes it there.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from bus.schemas import _Tagged, _Wire

__all__ = [
    "TERMINAL_STATES",
    "ArtifactInfo",
    "JobEvent",
    "JobKind",
    "JobRecord",
    "JobState",
    "JobSubmit",
    "combine_games",
]

JobKind = Literal["train", "eval"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})


class JobSubmit(_Tagged, frozen=True, kw_only=True, tag="job.submit"):
    """What sits in the work-queue stream until a worker takes it."""

    job_id: str
    kind: JobKind
    spec: msgspec.Raw
    submitted_at: float = 0.0
    submitted_by: str = ""


class JobEvent(_Tagged, frozen=True, kw_only=True, tag="job.event"):
    """One step of a job's life, on `cb.jobevt.<job_id>`; the last one has a terminal `state`.

    `metrics` carries numbers a UI plots (step, loss, lr, tokens_per_s, eta_s, ...);
    `result` is the kind's own final result struct, raw; `artifacts` are Object Store names.
    """

    job_id: str
    state: JobState
    event: str  # queued | started | progress | checkpoint | log | done | failed | cancelled
    at: float
    message: str = ""
    progress: float | None = None  # 0..1
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    artifacts: list[str] = msgspec.field(default_factory=list)
    result: Any = None  # decode with msgspec.convert(result, YourResultType)
    attempt: int = 1


class JobRecord(_Tagged, frozen=True, kw_only=True, tag="job.record"):
    """The job's current summary, in the `cb_jobs` KV bucket (for list/status without replay)."""

    job_id: str
    kind: JobKind
    state: JobState
    submitted_at: float
    updated_at: float
    spec: msgspec.Raw
    message: str = ""
    progress: float | None = None
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
    artifacts: list[str] = msgspec.field(default_factory=list)
    result: Any = None  # decode with msgspec.convert(result, YourResultType)
    attempt: int = 0
    # A train job's result judged against its base (judge/loop.py): the eval job, and once it is done
    # its score per model (single mode: mean rating 1-10) under the adapter's and the base's names.
    eval_job: str = ""
    scores: dict[str, float] = msgspec.field(default_factory=dict)


class ArtifactInfo(_Wire, frozen=True, kw_only=True):
    """`chatbus.json`, what a stored model dir says about itself: the trainer writes it, a node reads it
    (both through bus/artifacts.py) to know the name to serve it under and the base it applies to."""

    name: str
    base: str = ""  # the base model the adapter applies to ("", "default" or a dir or hub id)
    method: str = "lora"  # lora | qlora | full (full: the dir holds whole model weights)
    job_id: str = ""  # the train job that made it


def combine_games(g1_winner: str, g2_winner: str) -> str:
    """A pairwise eval judgment's result from its two games (judgments.jsonl's `g1_winner` /
    `g2_winner`, FastChat's format): a winner only when both orders agree, else a tie ('error' if a
    game failed). The judge writes the games; the judge's tables and the web app read them so."""
    if "error" in (g1_winner, g2_winner):
        return "error"
    if g1_winner == g2_winner:
        return g1_winner
    return "tie"
