"""What each `chatbus eval` command does, against the bus (the parser lives in judge/commands.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec

from bus import BusClient, JobRecord, Jobs
from judge.questions import dump_questions, load_questions, load_references, with_references
from judge.results import compute_agreement, show_result
from judge.schemas import EvalResult, EvalSpec
from judge.store import answers_name, judgments_name, parse_jsonl, to_jsonl
from judge.triggers import TriggerStore

__all__ = [
    "agreement",
    "cancel",
    "export",
    "follow",
    "list_jobs",
    "results",
    "spec_from",
    "status",
    "submit",
    "triggers",
    "unwatch",
    "watch",
]

Record = dict[str, Any]


def spec_from(args: argparse.Namespace, questions_ref: str = "") -> EvalSpec:
    def ids(text: str) -> list[int | str]:
        return [int(x) if x.strip().isdigit() else x.strip() for x in text.split(",") if x.strip()]

    return EvalSpec(
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        judge=args.judge,
        mode=args.mode,
        baseline=args.baseline,
        judge_base_url=args.judge_base_url,
        judge_api_key_env=args.judge_api_key_env,
        questions=questions_ref,
        question_ids=ids(args.question_ids),
        max_questions=args.max_questions,
        max_tokens=args.max_tokens,
        judge_max_tokens=args.judge_max_tokens,
        temperature=args.temperature,
        concurrency=args.concurrency,
        timeout_s=args.timeout,
        wait_models_s=args.wait_models,
        label=args.label,
    )


@contextlib.asynccontextmanager
async def _bus(url: str) -> AsyncIterator[tuple[BusClient, Jobs]]:
    client = await BusClient.connect(url, name="chatbus-eval")
    try:
        yield client, await client.jobs()
    finally:
        await client.close()


async def _questions_ref(jobs: Jobs, args: argparse.Namespace) -> str:
    """Upload the question file (with references merged in) and return its Object Store name."""
    if args.questions is None and args.references is None:
        return ""
    questions = load_questions(args.questions)
    if args.references is not None:
        questions = with_references(questions, load_references(args.references))
    return await jobs.put_artifact("eval/questions", dump_questions(questions))


async def _eval_id(jobs: Jobs, ref: str) -> str:
    """An eval job id, or a train job id standing for the eval that judged its result (judge/loop.py)."""
    record = await jobs.get(ref)
    if record is not None and record.kind == "train":
        if not record.eval_job:
            raise ValueError(
                f"train job {ref} has not been evaluated (yet): a judge worker (`python -m judge`) "
                "evaluates each finished train job once its result is served"
            )
        return record.eval_job
    return ref


async def _record(jobs: Jobs, job_id: str) -> JobRecord:
    record = await jobs.get(job_id)
    if record is None or record.kind != "eval":
        raise ValueError(f"no eval job {job_id!r}; `chatbus eval list` shows them")
    return record


def _spec(record: JobRecord) -> EvalSpec:
    return msgspec.json.decode(record.spec, type=EvalSpec)


def _print_result(result: EvalResult) -> None:
    failures = ", ".join(f"{k} {v}" for k, v in sorted(result.failures.items())) or "none"
    print(
        f"{result.questions} questions, {result.answers} answers ({result.answers_resumed} resumed), "
        f"{result.judged}/{result.judgments} judgments usable; failures: {failures}"
    )


async def _follow(jobs: Jobs, job_id: str) -> int:
    last = None
    async for event in jobs.events(job_id):
        line = f"[{event.state}] {event.event}"
        if event.progress is not None:
            line += f" {event.progress:.0%}"
        if event.message:
            line += f" {event.message}"
        print(line, flush=True)
        last = event
    if last is None or last.state != "done":
        return 1
    await _print_tables(jobs, job_id)
    return 0


async def _print_tables(jobs: Jobs, job_id: str) -> None:
    record = await _record(jobs, job_id)
    if record.result is not None:
        _print_result(msgspec.convert(record.result, EvalResult))
    judgments = parse_jsonl(await jobs.get_artifact(judgments_name(job_id)))
    print(show_result(judgments, baseline=_spec(record).baseline))


async def submit(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (client, jobs):
        spec = spec_from(args, await _questions_ref(jobs, args))
        problems = spec.problems()
        if problems:
            raise ValueError("; ".join(problems))
        missing = [m for m in spec.answer_models() if m not in client.models()]
        if missing:
            print(
                f"note: not served right now: {', '.join(missing)} (the worker waits {spec.wait_models_s:.0f}s)"
            )
        job_id = await jobs.submit("eval", spec, by="chatbus eval")
        print(job_id, flush=True)
        return await _follow(jobs, job_id) if args.follow else 0


async def follow(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (_, jobs):
        job_id = await _eval_id(jobs, args.job)
        await _record(jobs, job_id)
        return await _follow(jobs, job_id)


async def results(args: argparse.Namespace, url: str) -> int:
    if args.file is not None:
        print(show_result(parse_jsonl(args.file.read_text(encoding="utf-8")), baseline=args.baseline or ""))
        return 0
    if not args.job:
        raise ValueError("pass a job id or --file judgments.jsonl")
    async with _bus(url) as (_, jobs):
        job_id = await _eval_id(jobs, args.job)
        record = await _record(jobs, job_id)
        if job_id != args.job:
            print(f"{job_id}: {_spec(record).label}")
        if record.state != "done":
            print(f"job {job_id} is {record.state}; tables from what is judged so far", file=sys.stderr)
        if not await jobs.has_artifact(judgments_name(job_id)):
            raise ValueError(f"job {job_id} has no judgments yet")
        await _print_tables(jobs, job_id)
    return 0


def _local_jsonl(ref: str) -> list[Record] | None:
    path = Path(ref)
    if path.suffix == ".jsonl" and path.exists():
        return parse_jsonl(path.read_text(encoding="utf-8"))
    return None


async def _judgments(jobs: Jobs, ref: str) -> list[Record]:
    local = _local_jsonl(ref)
    if local is not None:
        return local
    await _record(jobs, ref)
    return parse_jsonl(await jobs.get_artifact(judgments_name(ref)))


async def agreement(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (_, jobs):
        first, second = await _judgments(jobs, args.first), await _judgments(jobs, args.second)
    result = compute_agreement(first, second)
    print(result)
    return 0 if result.n else 1


async def export(args: argparse.Namespace, url: str) -> int:
    """FastChat's folder layout: question.jsonl, model_answer/<model>.jsonl, model_judgment/<judge>_<mode>.jsonl."""
    async with _bus(url) as (_, jobs):
        record = await _record(jobs, args.job)
        spec = _spec(record)
        questions = (
            (await jobs.get_artifact(spec.questions)) if spec.questions else dump_questions(load_questions())
        )
        answers = parse_jsonl(await jobs.get_artifact(answers_name(args.job)))
        judgments = []
        if await jobs.has_artifact(judgments_name(args.job)):
            judgments = parse_jsonl(await jobs.get_artifact(judgments_name(args.job)))
    out: Path = args.out
    (out / "model_answer").mkdir(parents=True, exist_ok=True)
    (out / "model_judgment").mkdir(parents=True, exist_ok=True)
    (out / "question.jsonl").write_bytes(questions)
    written = [out / "question.jsonl"]
    for model in sorted({a["model_id"] for a in answers}):
        path = out / "model_answer" / f"{_file_safe(model)}.jsonl"
        rows = sorted((a for a in answers if a["model_id"] == model), key=lambda a: str(a["question_id"]))
        path.write_bytes(to_jsonl(rows))
        written.append(path)
    kind = "single" if spec.mode == "single" else "pair"
    path = out / "model_judgment" / f"{_file_safe(spec.judge)}_{kind}.jsonl"
    path.write_bytes(to_jsonl(judgments))
    written.append(path)
    for p in written:
        print(p)
    return 0


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


async def list_jobs(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (_, jobs):
        records = await jobs.list("eval")
    if not records:
        print("no eval jobs")
    for r in records:
        spec = _spec(r)
        progress = f"{r.progress:.0%}" if r.progress is not None else "-"
        print(
            f"{r.job_id:<40} {r.state:<10} {progress:>5}  {spec.mode:<18} {','.join(spec.models)} judge={spec.judge}"
        )
    return 0


async def status(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (_, jobs):
        r = await _record(jobs, args.job)
    print(
        json.dumps(
            {
                "job_id": r.job_id,
                "state": r.state,
                "progress": r.progress,
                "message": r.message,
                "attempt": r.attempt,
                "metrics": r.metrics,
                "artifacts": r.artifacts,
                "spec": msgspec.to_builtins(_spec(r)),
                "result": r.result,
            },
            indent=2,
        )
    )
    return 0 if r.state != "failed" else 1


async def cancel(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (_, jobs):
        await _record(jobs, args.job)
        record = await jobs.cancel(args.job)
    print(f"{args.job}: cancel sent (was {record.state})")
    return 0


async def watch(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (client, jobs):
        spec = spec_from(args, await _questions_ref(jobs, args))
        if spec.mode == "pairwise-baseline" and not spec.baseline:
            raise ValueError("pairwise-baseline needs --baseline MODEL")
        trigger = await TriggerStore(client).add(spec, args.match, args.include_current)
    print(
        f"{trigger.trigger_id}: a judge worker (`python -m judge`) evaluates each new model matching {args.match!r}"
    )
    return 0


async def triggers(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (client, _):
        found = await TriggerStore(client).list()
    if not found:
        print("no auto-eval triggers; add one with `chatbus eval watch --judge J ...`")
    for t, _rev in found:
        fired = ", ".join(f"{m}->{j}" for m, j in t.fired.items()) or "nothing yet"
        print(f"{t.trigger_id}  match={t.match!r} mode={t.spec.mode} judge={t.spec.judge}  fired: {fired}")
    return 0


async def unwatch(args: argparse.Namespace, url: str) -> int:
    async with _bus(url) as (client, _):
        removed = await TriggerStore(client).remove(args.trigger)
    print(f"{args.trigger}: {'removed' if removed else 'no such trigger'}")
    return 0 if removed else 1
