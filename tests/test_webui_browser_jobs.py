"""The Jobs, Usage and Nodes pages in headless Chromium against `python -m webui` and a real nats-server.

The jobs are run by scripted workers in this process (a real `JobWorker` on the real queue, whose handler
reports steps and stores results shaped like the trainer's and the judge's): the feature here is the page,
not training or judging, which tests/test_trainer_jobs.py and tests/test_judge*.py cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from fakes import EchoEngine, echo_node, user
from test_webui_browser import CHROMIUM, Page, free_port, page, webui_process, workdir

from bus import BusClient, encode, subjects
from bus.jobs import JobContext, JobWorker
from bus.keys import add_usage, create_key
from bus.operations import ensure_keys_bucket, ensure_usage_bucket
from bus.schemas_logs import ConvState, VoteLog
from judge.schemas import EvalResult
from node.engine import EngineStats
from trainer.schemas import TrainResult

__all__ = ["page", "workdir"]  # fixtures, imported so that pytest finds them here

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)


class RatedEcho(EchoEngine):
    """An echo engine that reports a decode speed (the plain one says 0), for the Nodes page's chart."""

    RATE = 42.5

    def stats(self) -> EngineStats:
        return dataclasses.replace(super().stats(), tokens_per_s=self.RATE)


class FakeTrain(msgspec.Struct, frozen=True):
    steps: int = 8
    step_s: float = 0.05
    gate: str = ""  # wait at the first step until the test opens GATES[gate] (no race with the page)


GATES: dict[str, asyncio.Event] = {}


class FakeEval(msgspec.Struct, frozen=True):
    models: list[str]


def loss_at(step: int) -> float:
    return round(3.0 / step, 4)


async def fake_train(ctx: JobContext) -> msgspec.Raw:
    """Every step's loss in the metrics file, but only every other one in an event (as with log_every=2)."""
    spec = msgspec.json.decode(ctx.submit.spec, type=FakeTrain)
    history = []
    for step in range(1, spec.steps + 1):
        ctx.check_cancelled()
        if spec.gate and step == 2:
            await GATES[spec.gate].wait()
        await asyncio.sleep(spec.step_s)
        metrics = {"step": float(step), "total_steps": float(spec.steps), "loss": loss_at(step)}
        history.append(metrics)
        if step % 2 == 0:
            await ctx.emit("progress", progress=step / spec.steps, metrics=metrics)
        if step == 4:
            await ctx.emit("checkpoint", metrics={"step": 4.0}, artifacts=[f"ckpt/{ctx.job_id}"])
    name = await ctx.jobs.put_named(
        f"train/{ctx.job_id}/metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history).encode()
    )
    result = TrainResult(method="lora", base="default", name="smol-codeword", artifact="models/abc", metrics=name,
                         steps=spec.steps, first_loss=loss_at(1), final_loss=loss_at(spec.steps))  # fmt: skip
    return msgspec.Raw(msgspec.json.encode(result))


JUDGMENTS = [  # (question, category, model, score)
    (81, "writing", "echo-a", 8), (82, "writing", "echo-a", 6), (91, "math", "echo-a", 3),
    (81, "writing", "echo-b", 4), (82, "writing", "echo-b", 4), (91, "math", "echo-b", 9),
]  # fmt: skip


async def fake_eval(ctx: JobContext) -> msgspec.Raw:
    records = [
        {"question_id": q, "category": c, "model": m, "turn": 1, "score": s, "judgment": f"Rating: [[{s}]]",
         "judge": ["judge-x", "single-v1"]}
        for q, c, m, s in JUDGMENTS
    ]  # fmt: skip
    records.append({"question_id": 92, "category": "math", "model": "echo-b", "turn": 1, "score": -1,
                    "judgment": "no verdict", "error": "unparseable"})  # fmt: skip
    name = await ctx.jobs.put_named(
        f"eval/{ctx.job_id}/judgments.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode()
    )
    result = EvalResult(mode="single", judge="judge-x", models=["echo-a", "echo-b"], questions=3, answers=6,
                        judgments=7, judged=6, failures={"unparseable": 1},
                        scores={"echo-a": 17 / 3, "echo-b": 17 / 3}, judgments_artifact=name)  # fmt: skip
    return msgspec.Raw(msgspec.json.encode(result))


@pytest.fixture(scope="module")
async def app(nats_url: str, client: BusClient, workdir: Path) -> AsyncIterator[str]:
    """The web app, an echo node and a scripted train and eval worker."""
    workers = [JobWorker(client.nc, "train", fake_train), JobWorker(client.nc, "eval", fake_eval)]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    async with echo_node(nats_url, RatedEcho("echo-jobs", step_s=0.05), node_id="echo-jobs-node"):
        port = free_port()
        with webui_process(nats_url, port, workdir / "state", workdir / "webui.log"):
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                for w in workers:
                    w.stop()
                for t in tasks:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(t, 5)


async def chart_points(page: Page, selector: str, series: int = 0) -> list:
    """The data of a NiceGUI echart's series, as the browser's chart holds it."""
    js = f"getElement(document.querySelector({json.dumps(selector)}))?.chart?.getOption()?.series?.[{series}]?.data"
    return list(await page.eval(f"({js}) || []") or [])


async def wait_state(client: BusClient, job_id: str, state: str, timeout: float = 20.0) -> None:
    jobs = await client.jobs()
    for _ in range(int(timeout * 10)):
        record = await jobs.get(job_id)
        if record is not None and record.state == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{job_id} never became {state}: {record}")


async def test_jobs_page_lists_a_job_with_its_live_state(page: Page, app: str, client: BusClient) -> None:
    await page.goto(app + "/jobs")
    await page.wait("document.body.innerText.includes('No jobs yet')")
    assert "chatbus train submit" in await page.text()  # the empty state says how to submit one
    await page.screenshot("jobs-empty")
    GATES["list"] = asyncio.Event()
    job_id = await client.submit_job("train", FakeTrain(steps=4, gate="list"))
    row = f"[...document.querySelectorAll('.q-table tbody tr')].find(r => r.innerText.includes({json.dumps(job_id)}))"
    await page.wait(f"{row}?.innerText.includes('running')", timeout=30)
    GATES["list"].set()
    await page.wait(f"{row}?.innerText.includes('done')", timeout=30)
    assert "No jobs yet" not in await page.text()
    await page.eval(f"{row}.click()")  # a row opens the job's page
    await page.wait(f"location.pathname === '/jobs/{job_id}'")


async def test_a_finished_train_job_shows_its_loss_chart_and_checkpoints(
    page: Page, app: str, client: BusClient
) -> None:
    job_id = await client.submit_job("train", FakeTrain(steps=8))
    await wait_state(client, job_id, "done")
    await page.goto(f"{app}/jobs/{job_id}")
    await page.wait("document.querySelector('.cb-train-name')?.innerText === 'smol-codeword'")
    # All 8 steps from the stored metrics file, though the events carried only every other one.
    for _ in range(100):
        points = await chart_points(page, ".cb-loss-chart")
        if len(points) == 8:
            break
        await asyncio.sleep(0.2)
    assert points == [[s, loss_at(s)] for s in range(1, 9)], points
    text = await page.text()
    assert f"checkpoint at step 4: ckpt/{job_id}" in text
    assert "3.000 → 0.375" in text
    await page.screenshot("job-train")


async def test_an_eval_job_shows_category_scores_and_verdicts(
    page: Page, app: str, client: BusClient
) -> None:
    job_id = await client.submit_job("eval", FakeEval(models=["echo-a", "echo-b"]))
    await wait_state(client, job_id, "done")
    await page.goto(f"{app}/jobs/{job_id}")
    await page.wait("document.querySelector('.q-table')?.innerText.includes('Rating: [[8]]')")
    categories = await page.eval(
        "getElement(document.querySelector('.cb-scores-chart')).chart.getOption().xAxis[0].data"
    )
    assert categories == ["math", "writing"]
    assert await chart_points(page, ".cb-scores-chart", 0) == [3, 7]  # echo-a: math 3, writing (8+6)/2
    assert await chart_points(page, ".cb-scores-chart", 1) == [9, 4]  # echo-b: the unparseable one left out
    table = await page.eval("document.querySelector('.q-table').innerText")
    assert "8/10" in table and "not scored (unparseable)" in table
    assert "6/7 judged" in await page.text()
    await page.screenshot("job-eval")
    # A train job whose record links this eval and its scores (the closed loop's `eval_job` and `scores`
    # fields, put as raw JSON: the page reads fields it may not know).
    train_id = await client.submit_job("train", FakeTrain(steps=2))
    await wait_state(client, train_id, "done")
    kv = await client.js.key_value(subjects.JOBS_BUCKET)
    raw = msgspec.json.decode((await kv.get(train_id)).value or b"{}")
    raw.update(eval_job=job_id, scores={"smol-codeword": 6.5, "default": 5.25})
    await kv.put(train_id, msgspec.json.encode(raw))
    await page.goto(f"{app}/jobs/{train_id}")
    await page.wait(
        "document.body.innerText.includes('judged against its base: scores smol-codeword 6.50 · default 5.25')"
    )
    link = await page.eval(
        "[...document.querySelectorAll('a')].find(a => a.innerText.includes('eval job'))?.href"
    )
    assert link and link.endswith(f"/jobs/{job_id}")
    assert f"{job_id}: scores echo-a 5.67 · echo-b 5.67" in await page.text()  # the linked job's own result
    # The leaderboard's second tab: the judge's scores beside the arena ratings (one battle: echo-a won).
    states = [ConvState(conv_id=f"c-{m}", model=m, messages=user("Hi?")) for m in ("echo-a", "echo-b")]
    vote = VoteLog(kind="leftvote", tstamp=time.time(), mode="arena", models=["echo-a", "echo-b"],
                   states=states, anonymous=True)  # fmt: skip
    await client.js.publish(subjects.log_vote(), encode(vote))
    await page.goto(app + "/leaderboard")
    await page.wait("document.querySelector('.cb-stat-rated')?.innerText === '1'")
    await page.eval(
        "[...document.querySelectorAll('.q-tab')].find(t => t.innerText.includes('Judge scores')).click()"
    )
    rows_js = "[...document.querySelectorAll('.cb-judge-scores tbody tr')].map(r => r.innerText.split('\\t'))"
    await page.wait(f"({rows_js}).length === 2 && ({rows_js})[0][2] !== '—'")  # the arena's rating has come
    rows = await page.eval(rows_js)
    assert [r[:2] for r in rows] == [["echo-a", "5.67 / 10"], ["echo-b", "5.67 / 10"]], rows
    assert int(rows[0][2]) > 1000 > int(rows[1][2]) and rows[0][3] == "1", rows  # BT rating, battles
    assert rows[0][6] == job_id
    await page.screenshot("leaderboard-judge")


async def test_cancel_from_the_page_cancels_the_job(page: Page, app: str, client: BusClient) -> None:
    job_id = await client.submit_job("train", FakeTrain(steps=600, step_s=0.1))
    await wait_state(client, job_id, "running")
    await page.goto(f"{app}/jobs/{job_id}")
    await page.wait("document.querySelector('.q-badge')?.innerText.includes('running')")
    # While it runs, the loss curve grows from its progress events (every other step).
    for _ in range(100):
        live = await chart_points(page, ".cb-loss-chart")
        if len(live) >= 3:
            break
        await asyncio.sleep(0.2)
    assert [p[0] for p in live[:3]] == [2, 4, 6] and live[0][1] == loss_at(2), live
    await page.click_text("Cancel job")
    await wait_state(client, job_id, "cancelled")
    await page.wait("[...document.querySelectorAll('.q-badge')].some(b => b.innerText.includes('cancelled'))")
    record = await (await client.jobs()).get(job_id)
    assert record is not None and record.progress is not None and record.progress < 1.0
    running = await client.submit_job("train", FakeTrain(steps=600, step_s=0.1))  # for the list's picture
    await wait_state(client, running, "running")
    await page.goto(app + "/jobs")
    await page.wait(f"document.querySelector('.q-table')?.innerText.includes({json.dumps(running)})")
    await page.screenshot("jobs")
    await (await client.jobs()).cancel(running)
    await wait_state(client, running, "cancelled")


async def test_usage_page_shows_a_keys_counts_to_admins_only(
    page: Page, app: str, client: BusClient, workdir: Path
) -> None:
    secret, record = await create_key(await ensure_keys_bucket(client.js), "team-a", rpm=60, tpm=20000)
    usage = await ensure_usage_bucket(client.js)
    for prompt, completion in ((11, 5), (20, 7)):
        await add_usage(usage, "team-a", "echo-jobs", prompt, completion, at=record.created_at)
    await page.goto(app + "/usage")
    await page.wait("document.body.innerText.includes('For admins only')")
    assert "team-a" not in await page.text()
    await page.type("input[type=password]", "not-the-token")
    await page.click_text("Sign in")
    await page.wait("document.body.innerText.includes('not the admin token')")
    token = (workdir / "state" / "admin-token").read_text().strip()
    await page.eval("document.querySelector('input[type=password]').select()")
    await page.send("Input.insertText", text=token)  # replaces the wrong one
    await page.click_text("Sign in")
    row = "[...document.querySelectorAll('.q-table tbody tr')].find(r => r.innerText.includes('team-a'))"
    cells = await page.wait(f"{row}?.innerText", timeout=20)
    assert cells.split("\t")[:6] == ["team-a", "live", "2", "2", "31", "12"], cells
    text = await page.text()
    assert secret not in text and record.sha256 not in text  # never a secret, nor its hash
    await page.eval(
        "document.querySelectorAll('.q-notification').forEach(n => n.remove())"
    )  # the wrong try's
    await page.screenshot("usage")


async def test_nodes_page_charts_points_from_an_echo_node(page: Page, app: str, client: BusClient) -> None:
    async def answer() -> None:
        async for _ in client.chat("echo-jobs", user("word " * 160)):  # 8 s at 0.05 s a word
            pass

    await page.goto(app + "/nodes")
    await page.wait("document.body.innerText.includes('echo-jobs-node')")
    answers = asyncio.gather(*(answer() for _ in range(2)))
    for _ in range(100):
        speed = await chart_points(page, ".cb-node-chart", 0)
        running = await chart_points(page, ".cb-node-chart", 1)
        if len(speed) >= 3 and 2 in running:
            break
        await asyncio.sleep(0.3)
    await answers
    # Points over time from the node's heartbeats: its reported speed, and the two answers running.
    assert len(speed) >= 3 and set(speed) == {RatedEcho.RATE}, speed
    assert 2 in running, running
    await page.screenshot("nodes-charts")
