"""The closed loop with scripted engines: a served train result is judged against its base, once, and
the scores land in the train job's record, its events, `chatbus eval results` and the CLI's table."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from fakes import EchoEngine
from permissions import refused
from procs import spawn
from test_judge_support import ScriptEngine, answerer, bus_engines, fair_judge, wait_models

from bus.auth import provision, with_credential
from bus.client import BusClient
from bus.jobs import Jobs
from bus.schemas import ModelCard
from bus.server import EmbeddedServer
from bus.tokens import issue, with_creds
from chatbus.cli import cmd_setup_bus
from judge.loop import AdapterEvalConfig, adapter_spec, claim_eval, record_scores, trained
from judge.schemas import EvalResult, EvalSpec
from judge.worker import WorkerConfig, serve
from trainer.closed_loop import LoopOptions, after_training
from trainer.schemas import TrainResult, TrainSpec


async def done_train_job(jobs: Jobs, name: str, base: str, base_name: str = "") -> str:
    """A train job as a trainer leaves it (no trainer runs here: its record is written directly)."""
    job_id = await jobs.submit("train", TrainSpec(data="datasets/none", base=base))
    record = await jobs.get(job_id)
    assert record is not None
    result = TrainResult(method="lora", base=base, base_name=base_name, name=name, artifact="models/x")
    done = msgspec.structs.replace(record, state="done", result=msgspec.to_builtins(result))
    await jobs.put_record(done)
    return job_id


@contextlib.asynccontextmanager
async def judge_workers(url: str, n: int) -> AsyncIterator[None]:
    cfg = WorkerConfig(
        nats=url,
        ack_wait_s=5.0,
        triggers=False,
        trigger_poll_s=0.2,
        adapter_evals=AdapterEvalConfig(questions=2, judge="judge-fair", max_tokens=32, wait_models_s=10),
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(serve(cfg, stop)) for _ in range(n)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def adapter_engine(name: str, base: str, reply: str) -> ScriptEngine:
    engine = ScriptEngine(name, answerer(reply), step_s=0.002)
    engine._card = ModelCard(name=name, context_length=100_000, base=base)  # served as an adapter of `base`
    return engine


async def test_served_result_is_judged_once_and_scored_everywhere(
    nats_url: str, client: BusClient, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = await client.jobs()
    base_engines: list[EchoEngine] = [
        ScriptEngine("base-m", answerer("bad"), step_s=0.002),
        ScriptEngine("judge-fair", fair_judge, step_s=0.002),
    ]
    # The record names no served base ("default" is a load spec): the node's ModelCard.base does.
    job_id = await done_train_job(jobs, "tuned-m", "default")
    async with bus_engines(nats_url, base_engines), judge_workers(nats_url, 2):
        await wait_models(client, ["base-m", "judge-fair"])
        loop = asyncio.create_task(after_training(jobs, nats_url, job_id, LoopOptions(evaluate=True)))
        await asyncio.sleep(1.0)  # the CLI waits for the result to be served
        assert not loop.done()
        async with bus_engines(nats_url, [adapter_engine("tuned-m", "base-m", "GOOD")]):
            code = await asyncio.wait_for(loop, 120)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "waiting for a node to serve tuned-m" in err and "served: tuned-m" in err

    record = await jobs.get(job_id)
    assert record is not None and record.eval_job and record.state == "done"
    assert record.scores == {"tuned-m": 8.0, "base-m": 3.0}  # the fair judge: GOOD 8, others 3
    table = out.splitlines()
    assert table[-4].split() == ["ROLE", "MODEL", "SCORE"]
    assert table[-3].split() == ["base", "base-m", "3.00"] and table[-2].split() == [
        "adapter",
        "tuned-m",
        "8.00",
    ]
    assert table[-1].split() == ["delta", "+5.00"]

    evals = [
        r for r in await jobs.list("eval") if msgspec.json.decode(r.spec, type=EvalSpec).train_job == job_id
    ]
    assert [r.job_id for r in evals] == [record.eval_job]  # two workers watched; one claimed it
    spec = msgspec.json.decode(evals[0].spec, type=EvalSpec)
    assert spec.models == ["tuned-m", "base-m"] and spec.judge == "judge-fair" and spec.max_questions == 2
    events = [e async for e in jobs.events(job_id, follow=False, past_end=True)]
    names = [e.event for e in events]
    assert names[-2:] == ["eval", "evaluated"], names
    assert events[-1].metrics == {"tuned-m": 8.0, "base-m": 3.0}

    cli = [sys.executable, "-m", "chatbus", "eval", "results", job_id, "--nats", nats_url]
    shown = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert record.eval_job in shown.stdout and "tuned-m" in shown.stdout and "base-m" in shown.stdout


async def test_loop_says_what_to_start(
    nats_url: str, client: BusClient, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = await client.jobs()
    job_id = await done_train_job(jobs, "lonely-m", "org/other-base", base_name="other-base")
    opts = LoopOptions(evaluate=True, serve_timeout_s=1.0, judge_timeout_s=1.0)
    assert await after_training(jobs, nats_url, job_id, opts) == 1  # nothing serves it
    err = capsys.readouterr().err
    assert "no node serves its base other-base" in err and f"chatbus node --adapter {job_id}" in err
    assert "is not served after 1s" in err

    async with bus_engines(nats_url, [ScriptEngine("lonely-m", answerer("x"), step_s=0.002)]):
        await wait_models(client, ["lonely-m"])
        assert await after_training(jobs, nats_url, job_id, opts) == 1  # served, but not its base
        err = capsys.readouterr().err
        assert "served: lonely-m" in err and "no node serves other-base: start one" in err
        async with bus_engines(nats_url, [ScriptEngine("other-base", answerer("y"), step_s=0.002)]):
            await wait_models(client, ["other-base"])
            assert await after_training(jobs, nats_url, job_id, opts) == 1  # both served, no judge runs
    err = capsys.readouterr().err
    assert "no judge took up lonely-m within 1s" in err and "python -m judge" in err
    record = await jobs.get(job_id)
    assert record is not None and not record.eval_job


async def test_ctrl_c_leaves_the_job_queued(nats_url: str, client: BusClient, tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text(
        '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}\n'
    )
    argv = [sys.executable, "-m", "chatbus", "train", "submit", "--nats", nats_url, "--data", str(data)]
    log = tmp_path / "cli.log"
    cli = spawn([*argv, "--eval"], log)  # no trainer runs: it follows a queued job
    jobs = await client.jobs()
    deadline = time.monotonic() + 60
    while not (queued := [r for r in await jobs.list("train") if r.state == "queued"]):
        assert cli.poll() is None and time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    cli.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(cli.wait, 30) == 130, log.read_text()
    job_id = queued[0].job_id
    assert f"job {job_id} goes on" in log.read_text() and f"chatbus eval follow {job_id}" in log.read_text()
    record = await jobs.get(job_id)
    assert record is not None and record.state == "queued"  # not cancelled: a trainer will take it


async def test_an_eval_only_worker_credential_claims_and_scores(tmp_path: Path) -> None:
    """`chatbus up` runs with a credential per role: the judge's writes to a train record must pass."""
    issue(tmp_path, "evals", "worker", kinds=["eval"])
    issue(tmp_path, "trains", "worker", kinds=["train"])
    prov = provision(tmp_path)
    server = EmbeddedServer(tmp_path / "js", port=0, log_file=tmp_path / "nats.log", config=prov.config)
    server.start()
    try:
        admin = with_credential(server.url, "admin", prov.passwords["admin"])
        await server.wait_jetstream(url=admin)
        assert await cmd_setup_bus(admin) == 0
        ui = await BusClient.connect(with_credential(server.url, "ui", prov.passwords["ui"]), name="cli")
        judge = await BusClient.connect(with_creds(server.url, tmp_path / "auth/creds/worker-evals.creds"))
        try:
            cli_jobs, judge_jobs = await ui.jobs(), await judge.jobs()
            job_id = await done_train_job(cli_jobs, "tuned-s", "default", base_name="base-s")
            record = await judge_jobs.get(job_id)
            assert record is not None and trained(record) == ("tuned-s", "base-s")
            spec = adapter_spec(AdapterEvalConfig(), job_id, "tuned-s", "base-s")
            eval_id = await claim_eval(judge_jobs, job_id, spec)
            assert eval_id and await claim_eval(judge_jobs, job_id, spec) == eval_id  # claimed once
            result = EvalResult(
                mode="single", judge="base-s", models=[], questions=1, answers=2, scores={"a": 1.0}
            )
            await record_scores(judge_jobs, eval_id, spec, result)
            seen = await cli_jobs.get(job_id)
            assert seen is not None and seen.eval_job == eval_id and seen.scores == {"a": 1.0}
            evaluation = await cli_jobs.get(eval_id)
            assert evaluation is not None and evaluation.state == "queued"
            creds = tmp_path / "auth/creds"
            assert await refused(
                with_creds(server.url, creds / "worker-evals.creds"), "pub", "cb.job.train.x"
            )
            assert await refused(
                with_creds(server.url, creds / "worker-trains.creds"), "pub", "cb.job.eval.x"
            )
        finally:
            await judge.close()
            await ui.close()
    finally:
        server.stop()
