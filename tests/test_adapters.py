"""Adapters as models on a running node (real bus, real model, float32): train → served without restart,
mixed batches, unload during a stream, the gateway's 404, another base refused, LRU eviction.

The tests run in file order on one node (`--max-adapters 2`): each says what it expects to find loaded.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
from adapters_support import make_adapter
from procs import node_process, spawn, stop, wait_until
from test_trainer_jobs import FACT, QUESTIONS, worker_argv

from bus import BusClient, ChatMessage, Done, SamplingParams
from bus.connection import connect
from bus.jobs import Jobs
from bus.schemas_adapters import AdapterCommand
from trainer.schemas import TrainResult

pytestmark = pytest.mark.model

CODE = "PLUMBUS-77"
BASE, ALIAS = "smol", "smol-alias"  # the default model, served as `--model-names smol,smol-alias`
TRUE_BASE = "SmolLM2-135M-Instruct"  # what adapters must be trained on
ASK = [ChatMessage(role="user", content=QUESTIONS[0])]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def node(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("adapter-node") / "node.log"
    extra = [
        "--dtype",
        "float32",
        "--serve-adapters",
        "--max-adapters",
        "2",
        "--model-names",
        f"{BASE},{ALIAS}",
    ]
    with node_process(nats_url, log, extra=extra) as proc:
        wait_until(lambda: BASE in _models(nats_url), 240, proc, log)
        yield log
        assert proc.poll() is None, log.read_text()


@pytest.fixture(scope="module")
def gateway(nats_url: str, node: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("adapter-gateway") / "gateway.log"
    port = _free_port()
    argv = [sys.executable, "-m", "gateway", "--nats", nats_url, "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn(argv, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), 60, proc, log)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def loras(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from node.loader import load_model

    root = tmp_path_factory.mktemp("loras")
    model = load_model(None, cache_dir=model_cache, dtype="float32", progress=lambda _: None).model
    make_adapter(model, root / "style-a", seed=1, alpha=32)
    make_adapter(model, root / "style-b", seed=2, alpha=32)
    make_adapter(copy.deepcopy(model), root / "qwen-lora", seed=3, base="Qwen2.5-0.5B-Instruct")
    return root


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _models(nats_url: str) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        client = await BusClient.connect(nats_url, name="adapter-test-models")
        try:
            return {name: entry for name, entry in client.models().items()}
        finally:
            await client.close()

    return asyncio.run(ask())


def chatbus(nats_url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "chatbus", *args[:2], "--nats", nats_url, *args[2:]]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


async def answer(client: BusClient, model: str, params: SamplingParams = GREEDY) -> tuple[str, list[Any]]:
    stream = client.chat(model, ASK, params)
    events = [e async for e in stream]
    return stream.text, events


async def wait_models(
    client: BusClient, present: set[str], absent: frozenset[str] | set[str] = frozenset(), timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while not (present <= set(client.models()) and not absent & set(client.models())):
        assert time.monotonic() < deadline, f"models after {timeout}s: {sorted(client.models())}"
        await asyncio.sleep(0.1)


async def test_a_trained_adapter_is_served_within_seconds_and_batches_with_its_base(
    nats_url: str, node: Path, gateway: str, model_cache: Path, tmp_path: Path
) -> None:
    worker = spawn(worker_argv(nats_url, model_cache), tmp_path / "worker.log")
    try:
        data = tmp_path / "fact.jsonl"
        data.write_text(FACT)
        knobs = [
            "--max-steps",
            "8",
            "--lr",
            "1e-3",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--lora-r",
            "16",
        ]
        cli = await asyncio.to_thread(
            chatbus,
            nats_url,
            "train",
            "submit",
            "--data",
            str(data),
            *knobs,
            "--lora-alpha",
            "32",
            "--follow",
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
    finally:
        stop(worker, timeout=60)
    job_id = cli.stdout.splitlines()[0]
    nc = await connect(nats_url, name="adapter-test-jobs")
    record = await (await Jobs(nc).start()).get(job_id)
    await nc.close()
    assert record is not None and record.state == "done"
    name = msgspec.convert(record.result, TrainResult).name

    client = await BusClient.connect(nats_url, name="adapter-test")
    try:
        await wait_models(client, {name}, timeout=10)  # --serve-adapters: no command, no restart
        async with httpx.AsyncClient() as http:
            listed = {m["id"]: m for m in (await http.get(f"{gateway}/v1/models")).json()["data"]}
        assert (
            listed[name]["parent"] == BASE
            and listed[BASE]["parent"] is None
            and listed[ALIAS]["parent"] is None
        )

        base_alone, _ = await answer(client, BASE)
        tuned_alone, _ = await answer(client, name)
        assert CODE in tuned_alone and CODE not in base_alone
        assert (await answer(client, ALIAS))[0] == base_alone  # another name of the base
        # both in flight at once: decoded in the same batches, each row with its own adapter
        order: list[str] = []

        async def tagged(model: str) -> str:
            stream = client.chat(model, ASK, GREEDY)
            async for event in stream:
                order.append(f"{model}:{type(event).__name__}")
            return stream.text

        together = await asyncio.gather(tagged(BASE), tagged(name))
        assert together == [base_alone, tuned_alone]
        firsts = [order.index(f"{m}:Chunk") for m in (BASE, name)]
        assert max(firsts) < min(order.index(f"{m}:Done") for m in (BASE, name)), order  # they overlapped
    finally:
        await client.close()


async def test_unload_during_a_stream_ends_it_properly_then_404_lists_what_is_served(
    nats_url: str, node: Path, gateway: str, loras: Path
) -> None:
    cli = await asyncio.to_thread(chatbus, nats_url, "adapters", "load", str(loras / "style-a"))
    assert cli.returncode == 0 and f"serving style-a on base {BASE}" in cli.stdout, cli.stderr
    client = await BusClient.connect(nats_url, name="adapter-test")
    try:
        await wait_models(client, {"style-a"})
        node_id = client.models()["style-a"].nodes[0].node_id
        stream = client.chat("style-a", ASK, SamplingParams(temperature=0, max_tokens=200))
        events: list[Any] = []
        reply = None
        async for event in stream:
            events.append(event)
            if reply is None:  # after the first chunk: the answer is running
                reply = await client.adapters(node_id, AdapterCommand(action="unload", name="style-a"))
        assert reply is not None and reply.message == "unloaded style-a; 1 running answer(s) finish first"
        assert "style-a" not in {a.name for a in reply.adapters if not a.unloading}
        assert isinstance(events[-1], Done) and events[-1].usage.completion_tokens > 1, events[-1]
        await wait_models(client, {BASE}, {"style-a"})
        served = sorted(client.models())
    finally:
        await client.close()
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="none", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="style-a", messages=[{"role": "user", "content": "hi"}])
    assert (
        f"served models: {', '.join(served)}" in str(caught.value) and len(served) == 3
    )  # the base, its alias and the trained adapter


async def test_an_adapter_of_another_base_is_refused(nats_url: str, node: Path, loras: Path) -> None:
    cli = await asyncio.to_thread(chatbus, nats_url, "adapters", "load", str(loras / "qwen-lora"))
    assert cli.returncode == 1
    assert f"trained on 'Qwen2.5-0.5B-Instruct'; this node serves '{TRUE_BASE}'" in cli.stderr
    assert "qwen-lora" not in _served_by_cli(nats_url)


def _served_by_cli(nats_url: str) -> set[str]:
    result = chatbus(nats_url, "models", timeout=60)
    return {line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()}


async def test_max_adapters_evicts_the_least_recently_used_idle_one(
    nats_url: str, node: Path, loras: Path
) -> None:
    client = await BusClient.connect(nats_url, name="adapter-test")
    try:
        trained = [n for n in client.models() if n not in (BASE, ALIAS)]
        assert len(trained) == 1  # from the first test
        for name in ("style-a", "style-b"):  # the trained one is the least recently used now
            cli = await asyncio.to_thread(chatbus, nats_url, "adapters", "load", str(loras / name))
            assert cli.returncode == 0, cli.stderr
        await wait_models(client, {BASE, "style-a", "style-b"}, set(trained))
        a, _ = await answer(client, "style-a")
        b, _ = await answer(client, "style-b")
        assert a != b
    finally:
        await client.close()
    listing = await asyncio.to_thread(chatbus, nats_url, "adapters", "list")
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert sorted(r[0] for r in rows) == ["style-a", "style-b"] and {r[1] for r in rows} == {BASE}, (
        listing.stdout
    )
