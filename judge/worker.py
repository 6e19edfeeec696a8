"""The eval worker: answers, then judgments, as one resumable job; `serve` runs it with the triggers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from bus import BusClient, JobContext, Jobs, redact
from judge.answers import answer_key, answer_turns, generate_answers
from judge.backends import make_judge
from judge.judging import Judging, pairwise_key, run_bounded, single_key
from judge.loop import AdapterEvalConfig, AdapterWatcher, record_scores
from judge.prompts import load_prompts
from judge.questions import Question, load_questions, parse_questions, select
from judge.results import failure_counts, pairwise_stats, single_scores
from judge.schemas import EvalResult, EvalSpec
from judge.store import RecordStore, answers_name, judgments_name
from judge.triggers import TriggerWatcher

__all__ = ["EvalRunner", "WorkerConfig", "load_spec_questions", "serve"]

log = logging.getLogger(__name__)


async def load_spec_questions(jobs: Jobs, spec: EvalSpec) -> list[Question]:
    if spec.questions:
        questions = parse_questions((await jobs.get_artifact(spec.questions)).decode(), spec.questions)
    else:
        questions = await asyncio.to_thread(load_questions)
    chosen = select(questions, spec.question_ids, spec.max_questions)
    if not chosen:
        raise ValueError(f"no question matches question_ids={spec.question_ids}; check the ids in the file")
    return chosen


class Progress:
    """Turns item counts into throttled progress events (answers are the first half, judgments the second)."""

    def __init__(self, ctx: JobContext, answers_total: int, judgments_total: int) -> None:
        self.ctx = ctx
        self.n = {"answers": 0, "judgments": 0, "failures": 0}
        self.total = {"answers": max(1, answers_total), "judgments": max(1, judgments_total)}
        self._last = 0.0

    async def step(self, phase: str, failure: str | None, *, force: bool = False) -> None:
        self.n[phase] += 1
        if failure:
            self.n["failures"] += 1
        now = time.monotonic()
        finished = self.n[phase] >= self.total[phase]
        if not (force or finished or now - self._last >= 0.25):
            return
        self._last = now
        frac = 0.5 * min(1.0, self.n["answers"] / self.total["answers"])
        frac += 0.5 * min(1.0, self.n["judgments"] / self.total["judgments"])
        await self.ctx.emit(
            "progress",
            progress=round(min(frac, 0.99), 4),
            metrics={
                "answers_done": float(self.n["answers"]),
                "answers_total": float(self.total["answers"]),
                "judgments_done": float(self.n["judgments"]),
                "judgments_total": float(self.total["judgments"]),
                "failures": float(self.n["failures"]),
            },
            message=f"{phase} {self.n[phase]}/{self.total[phase]}",
        )


class EvalRunner:
    """The eval job handler; one per worker, sharing the worker's BusClient."""

    def __init__(self, client: BusClient, environ: Mapping[str, str] | None = None) -> None:
        self.client = client
        self.environ = dict(environ or {})

    async def __call__(self, ctx: JobContext) -> msgspec.Raw:
        spec = msgspec.json.decode(ctx.submit.spec, type=EvalSpec)
        problems = spec.problems()
        if problems:
            raise ValueError("; ".join(problems))
        questions = await load_spec_questions(ctx.jobs, spec)
        await self._wait_for_models(ctx, spec)
        models = spec.answer_models()
        stop = [ctx.cancelled, ctx.stopping]

        answers = RecordStore(ctx.jobs, answers_name(ctx.job_id), answer_key)
        await answers.load()
        have = {(str(q.question_id), m) for q in questions for m in models} & set(answers.records)
        judge_kind = "single" if spec.mode == "single" else "pairwise"
        judgments = RecordStore(
            ctx.jobs, judgments_name(ctx.job_id), single_key if judge_kind == "single" else pairwise_key
        )
        await judgments.load()
        progress = Progress(ctx, len(questions) * len(models), 0)
        progress.n["answers"] = len(have)
        await ctx.emit(
            "log", message=f"{len(questions)} questions, {len(models)} models; {len(have)} answers stored"
        )

        async def on_answer(kind: str | None) -> None:
            await progress.step("answers", kind)

        async def run(thunks: list) -> None:
            await run_bounded(thunks, spec.concurrency, stop, ctx.check_cancelled)

        try:
            generated, answer_failures = await generate_answers(
                self.client,
                answers,
                models,
                questions,
                max_tokens=spec.max_tokens,
                temperature=spec.temperature,
                timeout_s=spec.timeout_s,
                run=run,
                on_answer=on_answer,
            )
        finally:
            await answers.flush()
        await ctx.emit("checkpoint", artifacts=[answers.name], message=f"{generated} answers generated")
        ctx.check_cancelled()

        backend = make_judge(
            self.client,
            spec.judge,
            base_url=spec.judge_base_url,
            api_key_env=spec.judge_api_key_env,
            environ=self.environ,
            max_tokens=spec.judge_max_tokens,
            timeout_s=spec.timeout_s,
        )
        answer_turns_by_key = {k: answer_turns(r) for k, r in answers.records.items()}

        async def on_judgment(kind: str | None) -> None:
            await progress.step("judgments", kind)

        judging = Judging(backend, load_prompts(), judgments, questions, answer_turns_by_key, on_judgment)
        try:
            if judge_kind == "single":
                keys: list = judging.single_keys(spec.models)
                thunks = judging.single_thunks(spec.models)
            else:
                keys = judging.pairwise_keys(spec.pairs())
                thunks = judging.pairwise_thunks(spec.pairs())
            progress.total["judgments"] = max(1, len(keys))
            progress.n["judgments"] = judging.resumed
            await run(thunks)
        finally:
            await judgments.flush()
            await backend.aclose()
        await ctx.emit("checkpoint", artifacts=[answers.name, judgments.name], message="judging finished")
        wanted = [judgments.records[k] for k in keys if k in judgments.records]
        result = self._result(spec, questions, models, answers, wanted, judging, generated, answer_failures)
        if spec.train_job:
            await record_scores(ctx.jobs, ctx.job_id, spec, result)
        return msgspec.Raw(msgspec.json.encode(result))

    def _result(
        self,
        spec: EvalSpec,
        questions: list[Question],
        models: list[str],
        answers: RecordStore,
        wanted: list[dict],
        judging: Judging,
        generated: int,
        answer_failures: dict[str, int],
    ) -> EvalResult:
        failures = failure_counts(wanted)
        if judging.no_answer:
            failures["no_answer"] = judging.no_answer
        for kind, n in answer_failures.items():
            failures[f"answer_{kind}"] = n
        stored = sum((str(q.question_id), m) in answers.records for q in questions for m in models)
        scores: dict[str, float] = {}
        win_rates: dict[str, float] = {}
        if spec.mode == "single":
            for model, by in single_scores(wanted).items():
                scores[model] = round(sum(by["all"]) / len(by["all"]), 4)
        else:
            for (model, _), wl in pairwise_stats(wanted).items():
                if model != spec.baseline or spec.mode == "pairwise-all":
                    win_rates[model] = round(wl.win_rate_adjusted, 4)
        return EvalResult(
            mode=spec.mode,
            judge=spec.judge + (f" @ {spec.judge_base_url}" if spec.judge_base_url else ""),
            models=models,
            questions=len(questions),
            answers=stored,
            answers_generated=generated,
            answers_resumed=stored - generated,
            judgments=len(
                judging.single_keys(spec.models)
                if spec.mode == "single"
                else judging.pairwise_keys(spec.pairs())
            ),
            judged=sum(1 for r in wanted if not r.get("error")),
            judgments_made=judging.made,
            judgments_resumed=judging.resumed,
            failures=failures,
            scores=scores,
            win_rates=win_rates,
            answers_artifact=answers.name,
            judgments_artifact=judging.store.name,
        )

    async def _wait_for_models(self, ctx: JobContext, spec: EvalSpec) -> None:
        need = set(spec.answer_models()) | (set() if spec.judge_base_url else {spec.judge})
        deadline = time.monotonic() + spec.wait_models_s
        while True:
            missing = need - set(self.client.models())
            if not missing:
                return
            if time.monotonic() > deadline:
                served = ", ".join(sorted(self.client.models())) or "none"
                raise ValueError(
                    f"not served on the bus after {spec.wait_models_s:.0f}s: {', '.join(sorted(missing))} "
                    f"(served: {served}); start a node for each, or fix the names"
                )
            ctx.check_cancelled()
            await asyncio.sleep(0.5)


@dataclass
class WorkerConfig:
    nats: str
    ack_wait_s: float = 30.0
    triggers: bool = True
    trigger_poll_s: float = 2.0
    adapter_evals: AdapterEvalConfig | None = field(default_factory=AdapterEvalConfig)  # None: off
    environ: dict[str, str] = field(default_factory=dict)


async def serve(cfg: WorkerConfig, stop: asyncio.Event) -> None:
    """Run the eval worker (and the auto-eval triggers) until `stop` is set; a job in flight is handed back."""
    async with contextlib.AsyncExitStack() as stack:
        client = await BusClient.connect(cfg.nats, name="chatbus-judge")
        stack.push_async_callback(client.close)
        worker = client.job_worker("eval", EvalRunner(client, cfg.environ), ack_wait_s=cfg.ack_wait_s)
        tasks = [asyncio.create_task(worker.run(), name="eval-worker")]
        watchers: list[TriggerWatcher | AdapterWatcher] = []
        if cfg.triggers:
            watchers.append(TriggerWatcher(client, await client.jobs(), poll_s=cfg.trigger_poll_s))
        if cfg.adapter_evals is not None:
            watchers.append(
                AdapterWatcher(client, await client.jobs(), cfg.adapter_evals, poll_s=cfg.trigger_poll_s)
            )
        tasks += [asyncio.create_task(w.run(), name=type(w).__name__) for w in watchers]
        log.info("judge worker on %s", redact(cfg.nats))
        done_first = asyncio.create_task(stop.wait())
        await asyncio.wait([done_first, *tasks], return_when=asyncio.FIRST_COMPLETED)
        worker.stop()
        for w in watchers:
            w.stop()
        done_first.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                raise r
