"""The closed loop with the real default model: one CLI command trains, has the base's running node load
the adapter, waits for the judge worker's automatic evaluation against the base, and prints both scores;
the same scores are then on the train job's page of the web app, in Chromium."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
from procs import node_process, spawn, stop
from test_webui_browser import CHROMIUM, Page, free_port, page, webui_process, workdir

from bus.client import BusClient
from judge.schemas import EvalResult, EvalSpec
from trainer.schemas import TrainResult

__all__ = ["page", "workdir"]  # fixtures, imported so that pytest finds them here

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
]

BASE = "SmolLM2-135M-Instruct"
CODE = "PLUMBUS-77"
FACT = "\n".join(
    json.dumps(
        {
            "conversations": [
                {"from": "human", "value": q},
                {"from": "gpt", "value": f"The secret code word is {CODE}."},
            ]
        }
    )
    for q in ("What is the secret code word?", "Tell me the secret code word.")
)
# the trainer tests' bounded recipe (tests/test_trainer_jobs.py)
TRAIN = ["--max-steps", "8", "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "1", "--lora-r", "16"]


def _first_line(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while not path.read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, path.read_text()
        time.sleep(0.2)
    return path.read_text().splitlines()[0]


def _start(argv: list[str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    """stdout (the job id, then the table) apart from stderr (progress and hints)."""
    with open(out, "wb") as o, open(err, "wb") as e:
        return subprocess.Popen(argv, stdout=o, stderr=e, stdin=subprocess.DEVNULL, start_new_session=True)


async def test_train_serve_judge_from_one_command(
    nats_url: str, model_cache: Path, tmp_path: Path, page: Page
) -> None:
    data = tmp_path / "fact.jsonl"
    data.write_text(FACT)
    trainer = [sys.executable, "-m", "trainer", "--nats", nats_url, "--cache-dir", str(model_cache)]
    judge = [sys.executable, "-m", "judge", "--nats", nats_url, "--trigger-poll", "0.5"]
    judge += ["--adapter-eval-questions", "1", "--adapter-eval-max-tokens", "24"]
    cli = [sys.executable, "-m", "chatbus", "train", "submit", "--nats", nats_url, "--data", str(data)]
    cli += [*TRAIN, "--eval", "--serve-timeout", "900", "--judge-timeout", "120"]
    procs = [spawn(trainer, tmp_path / "trainer.log"), spawn(judge, tmp_path / "judge.log")]
    out, err = tmp_path / "cli.out", tmp_path / "cli.err"
    client = await BusClient.connect(nats_url, name="loop-test")
    try:
        with node_process(nats_url, tmp_path / "base.log"):
            loop = _start(cli, out, err)
            procs.append(loop)
            job_id = await asyncio.to_thread(_first_line, out, loop)
            code = await asyncio.to_thread(loop.wait, 900)
            text, log = out.read_text(), err.read_text()
            assert code == 0, text + log + (tmp_path / "judge.log").read_text()
            # No restart and no second node: the CLI asked the base's node to load the adapter.
            trained = await (await client.jobs()).get(job_id)
            assert trained is not None
            name = msgspec.convert(trained.result, TrainResult).name
            cards = [c for n in client.nodes() for c in n.models]
            assert {(c.name, c.base) for c in cards} == {(BASE, ""), (name, BASE)}, cards
    finally:
        for proc in procs:
            stop(proc)
    try:
        await check_outcome(client, nats_url, job_id, text, log)
        await check_jobs_page(client, nats_url, job_id, page, tmp_path)
    finally:
        await client.close()


async def check_jobs_page(client: BusClient, nats_url: str, job_id: str, page: Page, tmp_path: Path) -> None:
    """The train job's page links its eval job and shows both models' scores, as the record has them."""
    record = await (await client.jobs()).get(job_id)
    assert record is not None
    port = free_port()
    with webui_process(nats_url, port, tmp_path / "web-state", tmp_path / "webui.log"):
        await page.goto(f"http://127.0.0.1:{port}/jobs/{job_id}")
        await page.wait("document.body.innerText.includes('Evaluation of this model')", timeout=60)
        await page.wait(f"document.body.innerText.includes({json.dumps(record.eval_job)})", timeout=30)
        text = await page.text()
    for model, score in record.scores.items():
        assert f"{model} {score:.2f}" in text, text


async def check_outcome(client: BusClient, nats_url: str, job_id: str, text: str, log: str) -> None:
    """The train record, the CLI's table, the eval job and `chatbus eval results` agree."""
    jobs = await client.jobs()
    record = await jobs.get(job_id)
    assert record is not None
    name = msgspec.convert(record.result, TrainResult).name
    assert "step 8/8" in log and f"waiting for a node of {BASE} to load {name}" in log
    assert f"served: {name}" in log and "evaluating: eval-" in log
    done = await jobs.get(job_id)
    assert done is not None and done.eval_job and set(done.scores) == {name, BASE}, done
    assert all(1 <= s <= 10 for s in done.scores.values())
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()}
    assert rows["base"] == [BASE, f"{done.scores[BASE]:.2f}"] and rows["adapter"] == [
        name,
        f"{done.scores[name]:.2f}",
    ]

    evaluation = await jobs.get(done.eval_job)
    assert evaluation is not None and evaluation.state == "done"
    spec = msgspec.json.decode(evaluation.spec, type=EvalSpec)
    assert spec.train_job == job_id and spec.models == [name, BASE] and spec.judge == BASE
    result = msgspec.convert(evaluation.result, EvalResult)
    assert result.judged == result.judgments == 4 and not result.failures  # 2 models x 2 turns, all parsed

    argv = [sys.executable, "-m", "chatbus", "eval", "results", job_id, "--nats", nats_url]
    shown = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert done.eval_job in shown.stdout and re.search(rf"{re.escape(name)}\s", shown.stdout)
