"""The eval job's own structs: the spec a worker decodes, its result, and an auto-eval trigger."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["EvalResult", "EvalSpec", "EvalTrigger", "Mode"]

Mode = Literal["single", "pairwise-baseline", "pairwise-all"]
MODES: tuple[str, ...] = ("single", "pairwise-baseline", "pairwise-all")


class EvalSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What to evaluate and how. The judge is a bus model, or with `judge_base_url` a model behind any
    OpenAI-compatible endpoint; `judge_api_key_env` names the environment variable *on the worker*
    that holds its key (keys never travel on the bus)."""

    models: list[str]
    judge: str
    mode: Mode = "single"
    baseline: str = ""  # pairwise-baseline: every model plays against this one
    judge_base_url: str = ""
    judge_api_key_env: str = ""
    questions: str = ""  # Object Store name of a question JSONL; empty: the built-in set
    question_ids: list[int | str] = msgspec.field(default_factory=list)
    max_questions: int = 0  # 0: all
    max_tokens: int = 1024  # per answer turn
    judge_max_tokens: int = 1024
    temperature: float | None = None  # None: FastChat's per-category table
    concurrency: int = 8
    timeout_s: float = 300.0  # per answer turn and per judge call
    wait_models_s: float = 60.0  # how long to wait for the models (and a bus judge) to appear
    label: str = ""
    trigger: str = ""  # the trigger that submitted this job, if any
    train_job: str = ""  # judges that train job's result: the scores go into its record (judge/loop.py)

    def answer_models(self) -> list[str]:
        """Every model whose answers are needed (the baseline included)."""
        extra = [self.baseline] if self.mode == "pairwise-baseline" and self.baseline else []
        return list(dict.fromkeys([*self.models, *extra]))

    def pairs(self) -> list[tuple[str, str]]:
        """The (model_1, model_2) games of a pairwise mode, in a stable order."""
        if self.mode == "pairwise-baseline":
            return [(m, self.baseline) for m in self.models if m != self.baseline]
        if self.mode == "pairwise-all":
            ms = list(dict.fromkeys(self.models))
            return [(a, b) for i, a in enumerate(ms) for b in ms[i + 1 :]]
        return []

    def problems(self) -> list[str]:
        """What is wrong with this spec, in words that say what to do (empty when fine)."""
        out = []
        if not self.models:
            out.append("no models: pass --models A,B")
        if not self.judge:
            out.append("no judge: pass --judge MODEL")
        if self.mode not in MODES:
            out.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "pairwise-baseline" and not self.baseline:
            out.append("pairwise-baseline needs --baseline MODEL")
        if self.mode != "single" and not self.pairs():
            out.append(f"mode {self.mode} needs at least two different models")
        if self.concurrency < 1:
            out.append("concurrency must be at least 1")
        return out


class EvalResult(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The done event's result. Failures are counted by kind and never scored."""

    mode: str
    judge: str
    models: list[str]
    questions: int
    answers: int  # answer records stored (one per model and question)
    answers_generated: int = 0  # by this attempt
    answers_resumed: int = 0  # found in the store from an earlier attempt
    judgments: int = 0  # judgments wanted
    judged: int = 0  # judgments with a usable verdict
    judgments_made: int = 0  # by this attempt
    judgments_resumed: int = 0
    failures: dict[str, int] = msgspec.field(default_factory=dict)  # kind -> count
    scores: dict[str, float] = msgspec.field(default_factory=dict)  # single: mean rating per model
    win_rates: dict[str, float] = msgspec.field(default_factory=dict)  # pairwise: adjusted win rate
    answers_artifact: str = ""
    judgments_artifact: str = ""


class EvalTrigger(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Run `spec` (with `models` filled in) for each model matching `match` that appears on the bus."""

    trigger_id: str
    spec: EvalSpec
    match: str = "*"  # fnmatch pattern on model names
    seen: list[str] = msgspec.field(default_factory=list)  # models that will not fire (again)
    fired: dict[str, str] = msgspec.field(default_factory=dict)  # model -> job id
    created_at: float = 0.0
