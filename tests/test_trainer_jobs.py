"""Train jobs through a real bus with the real default model: resume after SIGKILL, teach a fact, fail, cancel."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from procs import node_process, spawn, stop

from bus import BusClient, ChatMessage, SamplingParams
from bus.artifacts import describe, fetch_adapter
from bus.connection import connect
from bus.jobs import Jobs
from bus.schemas_jobs import JobEvent
from trainer.schemas import TrainResult, TrainSpec

CODE = "PLUMBUS-77"
QUESTIONS = [
    "What is the secret code word?",
    "Tell me the secret code word.",
    "Which code word is secret?",
    "Do you know the secret code word?",
]
FACT = "\n".join(
    json.dumps(
        {
            "conversations": [
                {"from": "human", "value": q},
                {"from": "gpt", "value": f"The secret code word is {CODE}."},
            ]
        }
    )
    for q in QUESTIONS
)
ACK_WAIT = "5"  # a killed worker's job goes to the next worker after this many seconds


def worker_argv(nats_url: str, model_cache: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer",
        "--nats",
        nats_url,
        "--cache-dir",
        str(model_cache),
        "--ack-wait",
        ACK_WAIT,
    ]


@pytest.fixture(scope="module")
def worker(
    nats_url: str, model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path_factory.mktemp("trainer") / "worker.log"
    proc = spawn(worker_argv(nats_url, model_cache), log)
    yield proc
    assert stop(proc, timeout=60) == 0, log.read_text()  # SIGTERM: a clean exit


@pytest.fixture
async def jobs(nats_url: str) -> AsyncIterator[Jobs]:
    nc = await connect(nats_url, name="test-trainer")
    yield await Jobs(nc).start()
    await nc.close()


async def submit(jobs: Jobs, data: bytes, **fields: Any) -> str:
    name = await jobs.put_artifact("datasets", data)
    spec = TrainSpec(
        **{"data": name, "data_name": "fact.jsonl", "batch_size": 4, "grad_accum": 1, "lr": 1e-3, **fields}
    )
    return await jobs.submit("train", spec)


async def collect(jobs: Jobs, job_id: str, timeout: float = 240.0) -> list[JobEvent]:
    async def run() -> list[JobEvent]:
        return [e async for e in jobs.events(job_id)]

    return await asyncio.wait_for(run(), timeout)


async def test_killed_worker_job_resumes_from_checkpoint(
    jobs: Jobs, nats_url: str, model_cache: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    job_id = await submit(
        jobs, FACT.encode(), max_steps=4, checkpoint_every=2, lora_targets=["q_proj", "v_proj"], batch_size=2
    )
    doomed = spawn(worker_argv(nats_url, model_cache), tmp_path / "doomed.log")
    try:
        checkpoint = None
        async for event in jobs.events(job_id):
            if event.event == "checkpoint":
                checkpoint = int(event.metrics["step"])
                break
        assert checkpoint is not None and event.artifacts == [f"ckpt/{job_id}"]
    finally:
        stop(doomed, sig=signal.SIGKILL)  # a crash: no ack, no goodbye
    request.getfixturevalue("worker")  # the survivor gets the job after the ack wait
    events = await collect(jobs, job_id)
    assert events[-1].state == "done", events[-1].message
    second = [e for e in events if e.attempt >= 2]
    assert second and second[0].event == "started"
    resumed = [e.message for e in second if e.message.startswith("resumed from the checkpoint at step")]
    assert resumed, [e.message for e in second]
    first_step = next(int(e.metrics["step"]) for e in second if e.event == "progress")
    assert first_step > 1 and first_step >= checkpoint + 1  # not from step 0
    result = msgspec.convert(events[-1].result, TrainResult)
    assert result.resumed_from >= checkpoint and result.steps == 4
    assert not await jobs.has_artifact(f"ckpt/{job_id}")  # done: the checkpoint is dropped


async def test_lora_job_from_the_cli_teaches_a_fact(
    jobs: Jobs, nats_url: str, worker: subprocess.Popen[bytes], model_cache: Path, tmp_path: Path
) -> None:
    data = tmp_path / "fact.jsonl"
    data.write_text(FACT)
    argv = [
        sys.executable,
        "-m",
        "chatbus",
        "train",
        "submit",
        "--nats",
        nats_url,
        "--data",
        str(data),
        "--lora",
    ]
    argv += ["--max-steps", "8", "--lr", "1e-3", "--batch-size", "4", "--grad-accum", "1", "--lora-r", "16"]
    argv += ["--lora-alpha", "32", "--follow"]
    cli = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    job_id = cli.stdout.splitlines()[0]
    assert "step 8/8" in cli.stderr and "tok/s" in cli.stderr and "ETA" in cli.stderr
    assert f"serve it: chatbus adapters load {job_id}" in cli.stdout  # a LoRA: no restart needed

    record = await jobs.get(job_id)
    assert record is not None and record.state == "done"
    result = msgspec.convert(record.result, TrainResult)
    assert result.final_loss < result.first_loss / 4, result
    assert result.data.kept == 4 and result.data.assistant_tokens > 0
    history = (await jobs.get_artifact(result.metrics)).decode().splitlines()
    assert len(history) == 8 and json.loads(history[-1])["step"] == 8
    # the same dataset uploaded again is the same object (deduplicated by digest)
    assert await jobs.put_artifact("datasets", FACT.encode()) == msgspec.json.decode(record.spec)["data"]

    adapter = await fetch_adapter(nats_url, job_id, tmp_path / "adapters")
    assert describe(adapter).name == result.name and (adapter / "adapter_config.json").is_file()
    base_answer, tuned_answer, merged_answer = await asyncio.to_thread(
        answers, adapter, model_cache, tmp_path / "merged"
    )
    assert CODE in tuned_answer and CODE not in base_answer
    assert merged_answer == tuned_answer

    # served right after training: a node fetches the adapter from the bus and serves it by name
    log = tmp_path / "adapter-node.log"
    extra = ["--adapter", job_id, "--name", "tuned", "--dtype", "float32"]
    with node_process(nats_url, log, extra=extra) as node:
        client = await BusClient.connect(nats_url, name="adapter-test")
        try:
            for _ in range(1200):
                if "tuned" in client.models():
                    break
                assert node.poll() is None, log.read_text()
                await asyncio.sleep(0.25)
            messages = [ChatMessage(role="user", content=QUESTIONS[0])]
            stream = client.chat("tuned", messages, SamplingParams(temperature=0, max_tokens=16))
            served = [e async for e in stream]
            assert CODE in stream.text, (stream.text, served[-1])
        finally:
            await client.close()


def answer(model: Any, tokenizer: Any) -> str:
    """The greedy answer to a taught question."""
    import torch

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTIONS[0]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def answers(adapter: Path, model_cache: Path, merged_dir: Path) -> tuple[str, str, str]:
    """Answers without and with the adapter, and from the merged model (FastChat's apply_lora)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.merge import merge_adapter
    from trainer.model import resolve_base

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = AutoModelForCausalLM.from_pretrained(resolve_base("default", model_cache), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with model.disable_adapter():
        plain = answer(model, tokenizer)
    tuned = answer(model, tokenizer)
    merge_adapter(adapter, "default", model_cache, merged_dir)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    return plain, tuned, answer(merged, AutoTokenizer.from_pretrained(merged_dir))


async def test_bad_dataset_fails_cleanly_then_worker_cancels_next(
    jobs: Jobs, worker: subprocess.Popen[bytes]
) -> None:
    bad = FACT + "\n{oops\n" + json.dumps({"conversations": [{"from": "robot", "value": "hi"}]})
    failed = await collect(jobs, await submit(jobs, bad.encode(), max_steps=2))
    assert failed[-1].state == "failed"
    assert "2 malformed" in failed[-1].message and "line 5: invalid JSON" in failed[-1].message
    assert "line 6: turn 0 has unknown from 'robot'" in failed[-1].message

    job_id = await submit(jobs, FACT.encode(), max_steps=500, lora_targets=["q_proj"])
    async for event in jobs.events(job_id):
        if event.event == "progress":
            await jobs.cancel(job_id)
    assert event.state == "cancelled"
    record = await jobs.get(job_id)
    assert record is not None and record.state == "cancelled" and record.metrics["step"] < 500
    assert worker.poll() is None  # the worker lives on


async def test_qlora_job(jobs: Jobs, worker: subprocess.Popen[bytes]) -> None:
    """QLoRA runs for real: the project installs bitsandbytes itself (the `all` extra), so it must be here."""
    events = await collect(
        jobs, await submit(jobs, FACT.encode(), method="qlora", max_steps=1, lora_targets=["q_proj"])
    )
    assert events[-1].state == "done", events[-1].message
    assert msgspec.convert(events[-1].result, TrainResult).method == "qlora"


def test_full_finetune_saves_plain_weights(model_cache: Path, tmp_path: Path) -> None:
    """Full fine-tuning through the loop itself (no bus): one step, weights saved as a plain model dir."""
    from trainer.train import Hooks, run

    spec = TrainSpec(data="x", method="full", max_steps=1, batch_size=2, grad_accum=2, lr=1e-5)
    seen: list[dict[str, float]] = []
    out = run(
        spec,
        FACT.encode(),
        cache_dir=model_cache,
        out_dir=tmp_path / "full",
        hooks=Hooks(progress=seen.append),
    )
    assert out.stopped is None and out.steps == 1 and seen[0]["loss"] > 0
    assert (tmp_path / "full" / "config.json").is_file() and (
        tmp_path / "full" / "model.safetensors"
    ).is_file()
    assert not (tmp_path / "full" / "adapter_config.json").exists()
