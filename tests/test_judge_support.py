"""Helpers for the judge tests: scripted answer/judge engines on the bus and an in-process eval worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable

import msgspec
from fakes import EchoEngine
from procs import eventually

from bus.client import BusClient
from bus.connection import connect
from bus.jobs import Jobs, JobWorker
from bus.schemas import ChatMessage
from judge.schemas import EvalResult, EvalSpec
from judge.worker import EvalRunner
from node.engine import EngineRequest
from node.service import NodeService


class ScriptEngine(EchoEngine):
    """Answers with `reply(request)` (word by word, like EchoEngine); counts the user turns it saw."""

    def __init__(self, name: str, reply: Callable[[EngineRequest], str], **kw: float) -> None:
        super().__init__(name, context=100_000, max_running=16, **kw)  # type: ignore[arg-type]
        self.reply = reply
        self.seen: Counter[str] = Counter()

    def submit(self, request, sink):  # type: ignore[no-untyped-def]
        self.seen[request.messages[-1].content] += 1
        text = self.reply(request) or "."
        scripted = dataclasses.replace(request, messages=[ChatMessage(role="user", content=text)])
        return super().submit(scripted, sink)


def answerer(tag: str) -> Callable[[EngineRequest], str]:
    return lambda req: f"{tag} answer to turn {sum(m.role == 'user' for m in req.messages)}"


def _section(text: str, who: str) -> str:
    m = re.search(rf"assistant {who}\n(.*?)## End of {who}", text, re.S)
    return m.group(1) if m else ""


def fair_judge(req: EngineRequest) -> str:
    """Grades GOOD answers 8 and others 3; in pairs, prefers the GOOD one whatever its position."""
    user = req.messages[-1].content
    if "assistant A" in user:
        a, b = "GOOD" in _section(user, "A"), "GOOD" in _section(user, "B")
        return "A is better. [[A]]" if a and not b else "B is better. [[B]]" if b and not a else "Same. [[C]]"
    return (
        "Rating: [[8]]"
        if "GOOD" in user.split("## The assistant's answer")[-1].split("### User")[-1]
        else "Meh [[3]]"
    )


def biased_judge(req: EngineRequest) -> str:
    return "The first one. [[A]]"


def garbage_judge(req: EngineRequest) -> str:
    return "Both answers are lovely and I will not choose."


@contextlib.asynccontextmanager
async def bus_engines(url: str, engines: list[EchoEngine]) -> AsyncIterator[None]:
    services = []
    for engine in engines:
        nc = await connect(url, name=f"node-{engine.card.name}")
        service = NodeService(nc, engine, max_queued=64)
        await service.start()
        services.append((service, nc))
    try:
        yield
    finally:
        for service, nc in services:
            await service.drain(timeout=2)
            await nc.close()


@contextlib.asynccontextmanager
async def eval_worker(url: str, environ: dict[str, str] | None = None) -> AsyncIterator[BusClient]:
    client = await BusClient.connect(url, name="judge-worker")
    worker = JobWorker(client.nc, "eval", EvalRunner(client, environ or {}), ack_wait_s=5.0)
    task = asyncio.create_task(worker.run())
    try:
        yield client
    finally:
        worker.stop()
        await task
        await client.close()


async def run_eval(jobs: Jobs, spec: EvalSpec) -> tuple[str, list, EvalResult | None]:  # type: ignore[type-arg]
    job_id = await jobs.submit("eval", spec)
    events = [e async for e in jobs.events(job_id, idle_timeout=240)]
    last = events[-1]
    result = msgspec.convert(last.result, EvalResult) if last.state == "done" else None
    return job_id, events, result


async def wait_models(client: BusClient, names: list[str], timeout: float = 180.0) -> None:
    await eventually(lambda: set(names) <= set(client.models()), timeout, what=f"models {names}")
