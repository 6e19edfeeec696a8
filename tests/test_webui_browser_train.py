"""A real train job (the trainer worker, the default model, four LoRA steps) on the Jobs page in Chromium:
its loss curve and checkpoint as the real worker reports them, not as a scripted one does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from procs import spawn, stop
from test_trainer_jobs import FACT, worker_argv
from test_webui_browser import CHROMIUM, Page, free_port, page, webui_process, workdir
from test_webui_browser_jobs import chart_points, wait_state

from bus import BusClient
from trainer.schemas import TrainSpec

__all__ = ["page", "workdir"]  # fixtures, imported so that pytest finds them here

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def trainer(nats_url: str, model_cache: Path, workdir: Path) -> Iterator[None]:
    proc = spawn(worker_argv(nats_url, model_cache), workdir / "trainer.log")
    yield
    stop(proc, timeout=60)


@pytest.fixture(scope="module")
async def app(nats_url: str, trainer: None, workdir: Path) -> AsyncIterator[str]:
    port = free_port()
    with webui_process(nats_url, port, workdir / "state", workdir / "webui.log"):
        yield f"http://127.0.0.1:{port}"


async def test_a_real_train_job_shows_its_loss_curve_and_checkpoint(
    page: Page, app: str, client: BusClient
) -> None:
    jobs = await client.jobs()
    data = await jobs.put_artifact("datasets", FACT.encode())
    spec = TrainSpec(data=data, data_name="fact.jsonl", batch_size=4, grad_accum=1, lr=1e-3, max_steps=4,
                     checkpoint_every=2, lora_targets=["q_proj", "v_proj"], name="web-codeword")  # fmt: skip
    job_id = await client.submit_job("train", spec)
    await page.goto(f"{app}/jobs/{job_id}")  # opened while it is queued or loading: the page follows it
    await wait_state(client, job_id, "done", timeout=300)
    await page.wait("document.querySelector('.cb-train-name')?.innerText === 'web-codeword'", timeout=30)
    for _ in range(100):
        points = await chart_points(page, ".cb-loss-chart")
        if len(points) == 4:
            break
        await asyncio.sleep(0.2)
    assert [p[0] for p in points] == [1, 2, 3, 4], points
    record = await jobs.get(job_id)
    assert record is not None and record.result is not None
    metrics = [
        json.loads(line) for line in (await jobs.get_artifact(record.result["metrics"])).decode().splitlines()
    ]
    assert [round(p[1], 4) for p in points] == [round(m["loss"], 4) for m in metrics]  # the real losses
    text = await page.text()
    assert f"checkpoint at step 2: ckpt/{job_id}" in text and "model: models/" in text
