"""Eval jobs end to end on a real nats-server with scripted answer and judge engines (deterministic)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest
from procs import eventually, spawn, stop
from test_judge_support import (
    ScriptEngine,
    answerer,
    biased_judge,
    bus_engines,
    eval_worker,
    fair_judge,
    garbage_judge,
    run_eval,
    wait_models,
)

from bus.schemas_jobs import JobRecord
from judge.questions import load_questions
from judge.results import show_result
from judge.schemas import EvalSpec
from judge.store import answers_name, judgments_name, parse_jsonl
from judge.triggers import TriggerStore, TriggerWatcher

MODELS = ["good-m", "bad-m"]
JUDGES = ["judge-fair", "judge-biased", "judge-garbage"]


@pytest.fixture(scope="module")
async def bus(nats_url: str):
    slow = ScriptEngine("slow-m", answerer("GOOD slow"), step_s=0.12)
    engines = [
        slow,
        ScriptEngine("good-m", answerer("GOOD"), step_s=0.005),
        ScriptEngine("bad-m", answerer("bad"), step_s=0.005),
        ScriptEngine("judge-fair", fair_judge, step_s=0.002),
        ScriptEngine("judge-biased", biased_judge, step_s=0.002),
        ScriptEngine("judge-garbage", garbage_judge, step_s=0.002),
    ]
    async with bus_engines(nats_url, engines), eval_worker(nats_url) as client:
        await wait_models(client, MODELS + JUDGES)
        yield client, await client.jobs(), slow


def spec(**kw) -> EvalSpec:  # type: ignore[no-untyped-def]
    base = {
        "models": MODELS,
        "judge": "judge-fair",
        "max_questions": 3,
        "max_tokens": 32,
        "wait_models_s": 10,
    }
    return EvalSpec(**{**base, **kw})


async def test_single_grades_follow_the_judge_and_store_fastchat_layout(bus) -> None:  # type: ignore[no-untyped-def]
    _, jobs, _ = bus
    job_id, events, result = await run_eval(jobs, spec(question_ids=[1, 7, 10]))
    assert result is not None, events[-1].message
    assert [e.event for e in events][:2] == ["queued", "started"] and events[-1].state == "done"
    assert any(e.event == "progress" for e in events)
    assert result.scores == {"good-m": 8.0, "bad-m": 3.0}
    assert result.judgments == result.judged == 3 * 2 * 2 and result.failures == {}
    answers = parse_jsonl(await jobs.get_artifact(answers_name(job_id)))
    assert len(answers) == 6 and answers[0]["choices"][0]["turns"][1].endswith("turn 2")
    assert set(answers[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    judgments = parse_jsonl(await jobs.get_artifact(judgments_name(job_id)))
    by_q = {(j["question_id"], j["turn"]): j["judge"][1] for j in judgments}
    assert by_q[(1, 1)] == "single" and by_q[(1, 2)] == "single-multi"
    assert by_q[(7, 1)] == "single-ref" and by_q[(10, 2)] == "single-ref-multi"  # math, coding
    assert "17 x 23 = 391" in next(j["user_prompt"] for j in judgments if j["question_id"] == 7)
    tables = show_result(judgments)
    assert "good-m" in tables and "8.00" in tables and "12/12 judgments usable" in tables


async def test_pairwise_position_swap(bus) -> None:  # type: ignore[no-untyped-def]
    _, jobs, _ = bus
    _, _, fair = await run_eval(jobs, spec(mode="pairwise-all", max_questions=2))
    assert fair is not None and fair.win_rates == {"good-m": 1.0, "bad-m": 0.0}
    assert fair.judgments == fair.judged == 2 * 2  # 2 questions x 2 turns, each judged in both orders
    # A judge that always picks the first answer shown disagrees with itself after the swap: ties.
    job_id, _, biased = await run_eval(
        jobs, spec(mode="pairwise-baseline", baseline="bad-m", models=["good-m"], judge="judge-biased")
    )
    assert biased is not None and biased.win_rates == {"good-m": 0.5} and biased.failures == {}
    judgments = parse_jsonl(await jobs.get_artifact(judgments_name(job_id)))
    assert {(j["g1_winner"], j["g2_winner"]) for j in judgments} == {("model_1", "model_2")}
    assert "tie" in show_result(judgments, baseline="bad-m")


async def test_unparseable_and_unreachable_judges_are_counted_never_scored(bus) -> None:  # type: ignore[no-untyped-def]
    _, jobs, _ = bus
    _, _, garbage = await run_eval(jobs, spec(judge="judge-garbage", max_questions=2))
    assert garbage is not None and garbage.judged == 0 and garbage.scores == {}
    assert garbage.failures == {"unparseable": garbage.judgments} and garbage.answers_resumed == 0
    _, _, pair = await run_eval(jobs, spec(judge="judge-garbage", mode="pairwise-all", max_questions=1))
    assert pair is not None and pair.failures == {"unparseable": 2} and pair.win_rates == {}
    endpoint = spec(judge="gpt-judge", judge_base_url="http://127.0.0.1:9/v1", max_questions=1, timeout_s=5)
    _, _, down = await run_eval(jobs, endpoint)
    assert down is not None and down.failures == {"unreachable": 4} and down.judged == 0
    _, events, _ = await run_eval(jobs, spec(judge="no-such-judge", wait_models_s=0.5))
    assert events[-1].state == "failed" and "no-such-judge" in events[-1].message
    _, events, _ = await run_eval(
        jobs, spec(judge="x", judge_base_url="http://h/v1", judge_api_key_env="NOPE_KEY")
    )
    assert events[-1].state == "failed" and "NOPE_KEY" in events[-1].message


async def test_cancel_stops_a_running_eval(bus) -> None:  # type: ignore[no-untyped-def]
    _, jobs, _ = bus
    job_id = await jobs.submit("eval", spec(max_questions=0, concurrency=1))
    async for e in jobs.events(job_id, idle_timeout=60):
        if e.event == "progress":
            await jobs.cancel(job_id)
    assert e.state == "cancelled"


async def test_resume_after_the_worker_is_killed(bus, nats_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, jobs, slow = bus
    # Keep the in-process worker busy with a slow job, so the subprocess worker takes ours.
    blocker = await jobs.submit("eval", spec(max_questions=0, concurrency=1, models=["slow-m"]))
    async for e in jobs.events(blocker, idle_timeout=60):
        if e.event in ("started", "progress"):
            break
    log = tmp_path / "judge.log"
    argv = [sys.executable, "-m", "judge", "--nats", nats_url, "--ack-wait", "2", "--no-triggers"]
    worker = spawn(argv, log)
    try:
        job = spec(models=["slow-m"], max_questions=6, concurrency=1)
        job_id = await jobs.submit("eval", job)
        async for e in jobs.events(job_id, idle_timeout=120):
            if e.metrics.get("answers_done", 0) >= 2:
                break
        stop(worker, sig=signal.SIGKILL)
        before = {
            a["question_id"]: a["answer_id"]
            for a in parse_jsonl(await jobs.get_artifact(answers_name(job_id)))
        }
        assert len(before) >= 2
        worker = spawn(argv, log)
        events = [e async for e in jobs.events(job_id, idle_timeout=120)]
        assert events[-1].state == "done", log.read_text()
        result = events[-1].result
        assert result["answers"] == 6 and result["answers_resumed"] >= len(before)
        after = {
            a["question_id"]: a["answer_id"]
            for a in parse_jsonl(await jobs.get_artifact(answers_name(job_id)))
        }
        assert all(after[q] == before[q] for q in before)  # kept, not regenerated
        asked_again = {t for t, n in slow.seen.items() if n > 2}  # the blocker asks each turn once too
        texts = {q.question_id: set(q.turns) for q in load_questions()}
        assert not any(texts[q] & asked_again for q in before)  # answers stored before the kill
        assert len(asked_again) <= 2  # only the turns of the question in flight at the kill
        assert max(e.attempt for e in events) >= 2
    finally:
        stop(worker)
        await jobs.cancel(blocker)


async def test_trigger_evaluates_a_new_model_once(bus, nats_url: str) -> None:  # type: ignore[no-untyped-def]
    client, jobs, _ = bus
    store = TriggerStore(client)
    trigger = await store.add(
        spec(models=[], mode="pairwise-baseline", baseline="bad-m", max_questions=1), "fresh-*"
    )
    watcher = TriggerWatcher(client, jobs)
    assert await watcher.tick() == []  # nothing new yet
    async with bus_engines(nats_url, [ScriptEngine("fresh-adapter", answerer("GOOD"), step_s=0.005)]):
        await wait_models(client, ["fresh-adapter"])
        submitted = await watcher.tick()
        assert len(submitted) == 1 and await watcher.tick() == []
        events = [e async for e in jobs.events(submitted[0], idle_timeout=60)]
        assert events[-1].state == "done" and events[-1].result["win_rates"] == {"fresh-adapter": 1.0}
    (saved, _rev), *_ = [p for p in await store.list() if p[0].trigger_id == trigger.trigger_id]
    assert saved.fired == {"fresh-adapter": submitted[0]}
    assert await store.remove(trigger.trigger_id)


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatbus",
        "eval",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_cli_submit_follow_results_export_agreement(bus, nats_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 5, "category": "math", "turns": ["1+1?", "times 3?"]}) + "\n")
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"question_id": 5, "choices": [{"index": 0, "turns": ["2", "6"]}]}) + "\n")
    common = ["--nats", nats_url, "--models", "good-m", "--mode", "pairwise-baseline", "--baseline", "bad-m"]
    rc, out = await _cli(
        "submit",
        *common,
        "--judge",
        "judge-fair",
        "--questions",
        str(qfile),
        "--references",
        str(refs),
        "--follow",
    )
    assert rc == 0, out
    job_a = out.splitlines()[0]
    assert "[done] done" in out and "win_rate_adjusted" in out and "good-m" in out
    rc, out = await _cli("submit", *common, "--judge", "judge-biased", "--questions", str(qfile), "--follow")
    job_b = out.splitlines()[0]
    rc, out = await _cli("results", "--nats", nats_url, job_a)
    assert rc == 0 and "Pairwise against bad-m" in out, out
    rc, out = await _cli("agreement", "--nats", nats_url, job_a, job_b)
    assert "agreement 0.0% over 2 shared votes" in out, out  # fair says good-m, biased says tie
    rc, out = await _cli("export", "--nats", nats_url, job_a, "--out", str(tmp_path / "x"))
    assert rc == 0, out
    judgments = parse_jsonl((tmp_path / "x" / "model_judgment" / "judge-fair_pair.jsonl").read_text())
    assert {j["judge"][1] for j in judgments} == {"pair-ref", "pair-ref-multi"}
    assert any("Turn 2: 6" in j["g1_user_prompt"] for j in judgments)  # the merged reference
    assert (tmp_path / "x" / "model_answer" / "good-m.jsonl").exists()
    rc, out = await _cli("list", "--nats", nats_url)
    assert job_a in out and job_b in out
    rc, out = await _cli("status", "--nats", nats_url, job_a)
    assert json.loads(out)["state"] == "done"
    rc, out = await _cli("watch", "--nats", nats_url, "--judge", "judge-fair", "--match", "zz-*")
    trigger_id = out.split(":")[0]
    assert rc == 0 and trigger_id.startswith("t-"), out
    rc, out = await _cli("triggers", "--nats", nats_url)
    assert trigger_id in out and "zz-*" in out
    rc, out = await _cli("unwatch", "--nats", nats_url, trigger_id)
    assert rc == 0 and "removed" in out


async def test_judge_worker_runs_triggers_by_itself(bus, nats_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """train -> serve -> judge without a person: a model appears, the worker's trigger submits its eval."""
    client, jobs, _ = bus
    trigger = await TriggerStore(client).add(spec(models=[], max_questions=1), "auto-*")
    log = tmp_path / "judge.log"
    worker = spawn([sys.executable, "-m", "judge", "--nats", nats_url, "--trigger-poll", "0.3"], log)
    try:
        async with bus_engines(nats_url, [ScriptEngine("auto-lora", answerer("GOOD"), step_s=0.005)]):
            mine: list[JobRecord] = []

            async def triggered_job_done() -> bool:
                mine[:] = [r for r in await jobs.list("eval") if b'"auto-lora"' in bytes(r.spec)]
                return bool(mine) and mine[0].state == "done"

            await eventually(triggered_job_done, 30, proc=worker, log=log, what="the triggered eval job")
            assert mine[0].result["scores"] == {"auto-lora": 8.0}
    finally:
        assert stop(worker) == 0, log.read_text()
        await TriggerStore(client).remove(trigger.trigger_id)
